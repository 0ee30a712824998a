"""Packed deployable format: integer weights bit-packed at their width, scales/zero-points/biases, in safetensors.

The file holds everything a fake-quant model needs except the FP weights: `load_quantized` builds the
architecture with random weights, `prepare()`s it with the stored QuantSpec/units and fills the quantizers, so
the rebuilt model computes exactly what the run's model computes. Per-layer tensors are concatenated into a few
flat tensors (offsets follow from the stored shapes) because a safetensors header entry per small tensor would
cost more than the 2-bit weights of a small network. A model that only torch.export can capture (a Hugging Face
model) is captured again on load from a zero batch of the stored `input_shape`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from metaaug.errors import ConfigError, ModelError
from metaaug.quant.grids import ACT_GRIDS
from metaaug.quant.prepare import QuantModel, QuantSpec, prepare
from metaaug.runs.files import atomic_path

FORMAT = "metaaug.packed/1"
# state-dict entries the flat tensors replace; everything else (unfolded BN, ...) is stored under `rest.`
_LAYER_KEYS = ("layer.weight", "layer.bias", "wq.scale", "wq.zero_point", "wq.w_floor", "wq.alpha")
_ACT_KEYS = ("scale", "signed", "initialized")


def pack_bits(values: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """Pack integers into a little-endian bit stream: value i occupies bits [i*b, (i+1)*b) (ONNX int4 order)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.detach().flatten().to(torch.int16)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
        raise ValueError(f"values outside the {'signed' if signed else 'unsigned'} {bits}-bit range [{lo}, {hi}]")
    v = (v & (2**bits - 1)).to(torch.uint8)  # two's complement for signed values
    if bits == 8:
        return v.clone()
    stream = ((v.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int, signed: bool = False) -> torch.Tensor:
    """Inverse of `pack_bits`: `count` values as uint8 (unsigned) or int8 (signed, sign-extended)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {count} {bits}-bit values")
    if bits == 8:
        v = packed.flatten().clone()
    else:
        stream = ((packed.flatten().unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[: count * bits]
        v = (stream.view(count, bits) << torch.arange(bits, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
    if not signed:
        return v
    v = v.to(torch.int16)
    return (v - (v >= 2 ** (bits - 1)).to(torch.int16) * 2**bits).to(torch.int8)


def packed_size(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def _layer_prefixes(qmodel: QuantModel) -> dict[int, str]:
    return {id(m): name + "." for name, m in qmodel.named_modules()}


def uint_weights(wq: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """The stored weight values `q = integer + z` in [0, 2^b - 1] (exact small integers held in float)."""
    q = (wq.integer(w) + wq.zero_point).round()
    if float(q.min()) < 0 or float(q.max()) > wq.levels:
        raise ModelError(f"weight grid values outside [0, {wq.levels}]: the quantizer state is inconsistent")
    return q.to(torch.uint8)


@torch.no_grad()
def save_packed(qmodel: QuantModel, path: str | Path, meta: dict[str, Any]) -> dict[str, int]:
    """Write the packed file; `meta` must hold model, method, spec (QuantSpec fields) and units.

    Returns byte counts: `file_bytes`, `packed_weight_bytes`, `fp32_weight_bytes`.
    """
    names = _layer_prefixes(qmodel)
    layers, acts = list(qmodel.quant_layers()), list(qmodel.act_quantizers())
    covered: set[str] = set()
    packed, scales, zps, biases, layer_meta = [], [], [], [], []
    for ql in layers:
        prefix, wq, w = names[id(ql)], ql.wq, ql.layer.weight
        covered.update(prefix + k for k in _LAYER_KEYS)
        q = uint_weights(wq, w) if ql.quantize_weight else None
        if q is None:
            raise ModelError(f"{prefix[:-1]} has weight quantization off; only fully quantized models can be packed")
        packed.append(pack_bits(q, wq.bits))
        scales.append(wq.scale.detach().float().flatten())
        zps.append(wq.zero_point.detach().round().to(torch.uint8).flatten())
        if ql.layer.bias is not None:
            biases.append(ql.layer.bias.detach().float().flatten())
        layer_meta.append([prefix[:-1], wq.bits, list(w.shape), ql.layer.bias is not None])
    act_meta = []
    for aq in acts:
        covered.update(names[id(aq)] + k for k in _ACT_KEYS)
        act_meta.append([names[id(aq)][:-1], aq.bits, _grid(aq)])
    tensors: dict[str, torch.Tensor] = {
        "weights": torch.cat(packed),
        "weight_scales": torch.cat(scales),
        "weight_zero_points": torch.cat(zps),
        "biases": torch.cat(biases) if biases else torch.zeros(0),
        "act_scales": torch.cat([aq.scale.detach().float().flatten() for aq in acts]) if acts else torch.zeros(0),
        "act_flags": torch.tensor([int(bool(aq.signed)) | 2 * int(bool(aq.initialized)) for aq in acts], dtype=torch.uint8),
    }
    for key, value in qmodel.state_dict().items():
        if key not in covered:
            tensors["rest." + key] = value.detach().cpu().contiguous()
    header = {
        "format": FORMAT,
        "model": str(meta["model"]),
        "method": str(meta["method"]),
        "spec": json.dumps(meta["spec"]),
        "units": json.dumps(meta["units"]),
        "fold_bn": json.dumps(bool(meta["spec"]["fold_bn"])),
        "bits": json.dumps({name: bits for name, bits, _, _ in layer_meta}, separators=(",", ":")),
        "layers": json.dumps(layer_meta, separators=(",", ":")),
        "acts": json.dumps(act_meta, separators=(",", ":")),
        "extra": json.dumps(meta.get("extra", {}), separators=(",", ":")),
    }
    if qmodel.input_shape is not None:
        header["input_shape"] = json.dumps(list(qmodel.input_shape))
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    return {
        "file_bytes": path.stat().st_size,
        "packed_weight_bytes": int(tensors["weights"].numel()),
        "fp32_weight_bytes": 4 * sum(ql.layer.weight.numel() for ql in layers),
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The packed file's metadata with the JSON fields decoded."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"quantized model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise ModelError(f"{path} is not a safetensors file: {str(exc).splitlines()[0]}") from None
    if raw.get("format") != FORMAT:
        raise ModelError(f"{path} is not a metaaug packed model (format {raw.get('format')!r}, expected {FORMAT!r})")
    meta: dict[str, Any] = {"format": raw["format"], "model": raw["model"], "method": raw["method"]}
    for key in ("spec", "units", "fold_bn", "bits", "layers", "acts", "extra"):
        meta[key] = json.loads(raw[key])
    meta["input_shape"] = json.loads(raw["input_shape"]) if "input_shape" in raw else None  # absent before ViT support
    return meta


def _grid(aq: torch.nn.Module) -> str:
    return getattr(aq, "grid", "uniform")


def _build_model(name: str) -> torch.nn.Module:
    """The architecture with random weights: the packed file replaces every value a forward pass reads."""
    from metaaug.models.registry import BUNDLED, _load_factory

    if name in BUNDLED:
        return BUNDLED[name]().eval()
    if ":" in name and name.rpartition(":")[0].endswith(".py"):
        return _load_factory(name)().eval()
    raise ModelError(f"unknown model {name!r} in the packed file")


def _take(flat: torch.Tensor, start: int, n: int, what: str) -> torch.Tensor:
    if start + n > flat.numel():
        raise ModelError(f"packed file is truncated: {what} ends past its flat tensor")
    return flat[start : start + n]


@torch.no_grad()
def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> QuantModel:
    """Rebuild the quantized model (quantization on, eval mode) from a packed file, without the FP checkpoint.

    The stored integer index goes into `w_floor` with `alpha = -1`, so hard rounding reproduces it exactly; the
    layer's FP weight is set to the dequantized weight so code that reads `.weight` sees what the model uses.
    """
    meta = read_metadata(path)
    # the stored tensors hold the reparameterised LayerNorm and Linear weights: rebuild without measuring again
    spec = dataclasses.replace(QuantSpec(**meta["spec"]), ln_reparam=False)
    shape = meta["input_shape"]
    qmodel = prepare(_build_model(meta["model"]), spec, meta["units"], example=torch.zeros(2, *shape) if shape else None)
    tensors = load_file(str(path))
    names = _layer_prefixes(qmodel)
    layers, acts = list(qmodel.quant_layers()), list(qmodel.act_quantizers())
    got = [names[id(ql)][:-1] for ql in layers]
    if got != [m[0] for m in meta["layers"]] or [names[id(a)][:-1] for a in acts] != [m[0] for m in meta["acts"]]:
        raise ModelError(f"{path} does not match the {meta['model']} architecture prepared with its spec/units")
    state: dict[str, torch.Tensor] = {}
    wpos = cpos = bpos = 0
    for ql, (name, bits, shape, has_bias) in zip(layers, meta["layers"], strict=True):
        if ql.wq.bits != bits or list(ql.layer.weight.shape) != shape:
            raise ModelError(f"{path}: layer {name} is {bits}-bit {shape} in the file but "
                             f"{ql.wq.bits}-bit {list(ql.layer.weight.shape)} after prepare()")
        count, channels = math.prod(shape), shape[0]
        nbytes = packed_size(count, bits)
        q = unpack_bits(_take(tensors["weights"], wpos, nbytes, name), bits, count).float().view(shape)
        scale = _take(tensors["weight_scales"], cpos, channels, name).view(ql.wq.scale.shape).clone()
        zp = _take(tensors["weight_zero_points"], cpos, channels, name).float().view(ql.wq.zero_point.shape)
        wpos, cpos = wpos + nbytes, cpos + channels
        integer = q - zp
        prefix = name + "."
        state[prefix + "layer.weight"] = integer * scale
        state[prefix + "wq.scale"] = scale
        state[prefix + "wq.zero_point"] = zp
        state[prefix + "wq.w_floor"] = integer
        state[prefix + "wq.alpha"] = torch.full(shape, -1.0)
        if has_bias:
            state[prefix + "layer.bias"] = _take(tensors["biases"], bpos, channels, name).clone()
            bpos += channels
    for i, (aq, (name, bits, *grid)) in enumerate(zip(acts, meta["acts"], strict=True)):
        if aq.bits != bits:
            raise ModelError(f"{path}: activation quantizer {name} is {bits}-bit in the file but {aq.bits}-bit after prepare()")
        if grid and grid[0] != _grid(aq):  # files before log2 grids hold [name, bits]: uniform
            if grid[0] not in ACT_GRIDS:
                raise ModelError(f"{path}: activation quantizer {name} has unknown grid {grid[0]!r}")
            aq.grid = grid[0]
        flags = int(tensors["act_flags"][i])
        state[name + ".scale"] = tensors["act_scales"][i : i + 1].clone()
        state[name + ".signed"] = torch.tensor(bool(flags & 1))
        state[name + ".initialized"] = torch.tensor(bool(flags & 2))
    state.update({k[len("rest."):]: v for k, v in tensors.items() if k.startswith("rest.")})
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{path} does not match the rebuilt model ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    qmodel.harden()
    qmodel.set_quant(True, True)
    return qmodel.to(device).eval()
