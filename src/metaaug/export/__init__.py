"""Deployable exports of a quantized run: a QDQ ONNX graph (needs the `onnx` extra) and a packed safetensors file."""

from metaaug.export.pack import load_quantized, pack_bits, read_metadata, save_packed, unpack_bits

__all__ = ["load_quantized", "pack_bits", "read_metadata", "save_packed", "unpack_bits"]
