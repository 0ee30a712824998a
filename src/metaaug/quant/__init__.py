"""Quantizers, BN folding and model preparation (the fake-quant model every method works on)."""

from metaaug.quant.layers import QuantLayer
from metaaug.quant.prepare import QuantModel, QuantSpec, prepare
from metaaug.quant.quantizers import ActQuantizer, WeightQuantizer

__all__ = ["ActQuantizer", "QuantLayer", "QuantModel", "QuantSpec", "WeightQuantizer", "prepare"]
