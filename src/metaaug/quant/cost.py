"""Cost of a bit-width policy: weight memory and BOPs, absolute and relative to FP32 and to uniform W8A8.

Weight memory counts what the packed format stores: each weight at its bit-width, per output channel an FP32
scale and an 8-bit zero-point, biases in FP32. BOPs = MACs x weight bits x input-activation bits; the first
layer's input is the image, counted at 8 bits (pixels), and FP32 counts 32 x 32. A matmul between two activations
(attention) counts MACs x the bits of its two inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from metaaug.quant.layers import QuantLayer
from metaaug.quant.policy import LayerBits
from metaaug.quant.prepare import QuantModel

IMAGE_BITS, FP_BITS, CHANNEL_BITS = 8, 32, 32 + 8


@dataclass(frozen=True)
class LayerInfo:
    """What a layer's cost depends on besides its bits (from one forward pass of a prepared model)."""

    name: str
    params: int
    out_channels: int
    bias: int
    macs: int
    reads_image: bool


@torch.no_grad()
def layer_macs(qmodel: QuantModel, example: torch.Tensor) -> dict[str, int]:
    """MACs per image of every quantized layer (output elements x (cin / groups) x kh x kw, or in_features) and every
    activation-activation matmul (output elements x inner dimension), from one forward pass of one image."""
    macs: dict[str, int] = {}

    def hook(mod, inp, out):
        inner = mod.layer.weight[0].numel() if isinstance(mod, QuantLayer) else int(inp[0].shape[-1])
        macs[mod.path] = int(out[0].numel()) * inner

    hooks = [m.register_forward_hook(hook) for m in (*qmodel.quant_layers(), *qmodel.matmuls())]
    try:
        qmodel(example[:1].to(next(qmodel.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return macs


def layer_infos(qmodel: QuantModel, example: torch.Tensor, macs: dict[str, int] | None = None) -> list[LayerInfo]:
    """Parameter and MAC counts per quantized layer; `example` is one input batch (only its shape matters), `macs`
    what `layer_macs` measured, if it has already run."""
    macs = macs if macs is not None else layer_macs(qmodel, example)
    return [LayerInfo(ql.path, ql.layer.weight.numel(), ql.layer.weight.shape[0],
                      0 if ql.layer.bias is None else ql.layer.bias.numel(), macs[ql.path], ql.abits is None)
            for ql in qmodel.quant_layers()]


@dataclass(frozen=True)
class MatmulInfo:
    """A matmul between two activations (attention's QK^T, attn.V): MACs per image and its two input bit-widths."""

    name: str
    role: str
    macs: int
    abits: tuple[int, int]


def matmul_infos(qmodel: QuantModel, example: torch.Tensor, macs: dict[str, int] | None = None) -> list[MatmulInfo]:
    """MACs per image and input bits of each `QuantMatmul`."""
    mms = list(qmodel.matmuls())
    if not mms:
        return []
    macs = macs if macs is not None else layer_macs(qmodel, example)
    return [MatmulInfo(mm.path, mm.role, macs[mm.path], (mm.qa.bits, mm.qb.bits)) for mm in mms]


def model_bits(qmodel: QuantModel) -> dict[str, LayerBits]:
    """The bits a prepared model actually uses, per layer (its effective policy)."""
    return {ql.path: LayerBits(ql.wq.bits, ql.abits or IMAGE_BITS) for ql in qmodel.quant_layers()}


def _weight_bits(info: LayerInfo, wbits: int) -> int:
    return info.params * wbits + info.out_channels * CHANNEL_BITS + info.bias * FP_BITS


def _abits(info: LayerInfo, bits: LayerBits) -> int:
    return IMAGE_BITS if info.reads_image else bits.abits


def policy_cost(infos: list[LayerInfo], bits: Mapping[str, LayerBits], matmuls: list[MatmulInfo] = ()) -> dict[str, Any]:
    """Weight memory and BOPs of `bits` per layer and in total, with the FP32 and uniform-W8A8 references.

    Activation-activation matmuls (`matmuls`) hold no weights; their BOPs are MACs x the bits of their two inputs."""
    mm_rows = [{**asdict(m), "abits": list(m.abits), "bops": m.macs * m.abits[0] * m.abits[1]} for m in matmuls]
    mm_bops, mm_macs = sum(r["bops"] for r in mm_rows), sum(m.macs for m in matmuls)
    layers = []
    for info in infos:
        b = bits[info.name]
        layers.append({**asdict(info), "wbits": b.wbits, "abits": None if info.reads_image else b.abits,
                       "weight_bits": _weight_bits(info, b.wbits), "bops": info.macs * b.wbits * _abits(info, b)})
    wbits = sum(r["weight_bits"] for r in layers)
    bops = sum(r["bops"] for r in layers) + mm_bops
    fp_w = sum((i.params + i.bias) * FP_BITS for i in infos)
    fp_bops = (sum(i.macs for i in infos) + mm_macs) * FP_BITS * FP_BITS
    w8_w = sum(_weight_bits(i, 8) for i in infos)
    w8_bops = (sum(i.macs for i in infos) + mm_macs) * 8 * 8
    params = sum(i.params for i in infos)
    return {
        "weight_bits": wbits, "weight_kb": round(wbits / 8 / 1024, 3), "bops": bops, "gbops": round(bops / 1e9, 4),
        "avg_wbits": round(sum(r["wbits"] * r["params"] for r in layers) / params, 4),
        "weight_vs_fp32": round(wbits / fp_w, 4), "weight_vs_w8a8": round(wbits / w8_w, 4),
        "bops_vs_fp32": round(bops / fp_bops, 6), "bops_vs_w8a8": round(bops / w8_bops, 4),
        "fp32_weight_kb": round(fp_w / 8 / 1024, 3), "w8a8_weight_kb": round(w8_w / 8 / 1024, 3),
        "fp32_gbops": round(fp_bops / 1e9, 4), "w8a8_gbops": round(w8_bops / 1e9, 4),
        "layers": layers,
        **({"matmuls": mm_rows} if mm_rows else {}),
    }


def model_cost(qmodel: QuantModel, example: torch.Tensor) -> dict[str, Any]:
    """The cost of a prepared model at the bits it uses."""
    macs = layer_macs(qmodel, example)
    return policy_cost(layer_infos(qmodel, example, macs), model_bits(qmodel), matmul_infos(qmodel, example, macs))
