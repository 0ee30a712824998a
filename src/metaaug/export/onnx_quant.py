"""ONNX for the quantizers, as a mixin of the exporter: weights as integer initializers with a per-channel
DequantizeLinear, activations as QuantizeLinear/DequantizeLinear pairs in a 4- or 8-bit container (`ACT_CONTAINERS`,
and `needs_wide` for the 4-bit pairs onnxruntime refuses), log2-grid activations as elementary ops."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from metaaug.errors import ConfigError
from metaaug.export.pack import pack_bits, uint_weights
from metaaug.quant.layers import QuantLayer
from metaaug.quant.quantizers import ActQuantizer

# Activation containers: "int4" puts every <= 4-bit quantizer in a 4-bit QDQ pair, "int8" every one in an 8-bit pair
# (exact: Clip bounds the range first), "auto" uses 4 bits only where onnxruntime accepts them.
ACT_CONTAINERS = ("auto", "int4", "int8")
# onnxruntime's QDQ passes move a QuantizeLinear backward and a DequantizeLinear forward through these ops
# (QDQPropagationTransformer) and then run them on the integer tensor, which works at 4 bits...
INT4_PASS_THROUGH = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})
# ...but not for these, which it then refuses (INVALID_GRAPH "Type 'tensor(uint4)' of input parameter (..q_to_dq) of
# operator (MaxPool)"; onnxruntime 1.32 refuses MaxPool, the others are kept out because their QDQ node units run on
# the integer tensor too).
INT4_REFUSED = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat", "Resize"})


def check_act_container(container: str) -> str:
    if container not in ACT_CONTAINERS:
        raise ConfigError(f"activation container must be one of {', '.join(ACT_CONTAINERS)}, got {container!r}")
    return container


class QuantizerOps:
    def weight(self, ql: QuantLayer, base: str, transpose: bool = False) -> str:
        """The dequantized weight; `transpose` gives a Linear's `W^T` (`[in, out]`, channel axis 1) for MatMul."""
        w = ql.layer.weight.detach()
        if not ql.quantize_weight:
            return self.b.const(base + "_w", (w.t() if transpose else w).float().numpy())
        wq = ql.wq
        q = uint_weights(wq, w)
        if transpose:
            q = q.t().contiguous()
        four = wq.bits <= 4
        dtype = self.tp.UINT4 if four else self.tp.UINT8
        qname = self.b.raw(base + "_wq", dtype, list(q.shape), pack_bits(q, 4 if four else 8).numpy().tobytes())
        zp = wq.zero_point.detach().round().to(torch.uint8).flatten()
        zname = self.b.raw(base + "_wzp", dtype, [zp.numel()], pack_bits(zp, 4 if four else 8).numpy().tobytes())
        sname = self.b.const(base + "_wscale", wq.scale.detach().float().flatten().numpy())
        return self.b.op("DequantizeLinear", [qname, sname, zname], base + "_wdq", axis=1 if transpose else 0)

    def act(self, aq: ActQuantizer, x: str, base: str) -> str:
        if not aq.enabled:
            return x
        if getattr(aq, "grid", "uniform") == "log2":
            return self.log2_act(aq, x, base)
        lo, hi = aq.bounds
        signed = bool(aq.signed)
        # a 1-element scale, not a scalar: onnxruntime's Clip -> QuantizeLinear fusion only reads scalar scales, and
        # throws on a 4-bit zero-point when it does
        scale = aq.scale.detach().float().reshape(1)
        four = aq.bits <= 4 and (self.container == "int4" or (self.container == "auto" and id(aq) not in self.wide))
        container = 4 if four else 8
        if aq.bits < container:
            cmin = self.b.const(base + "_lo", (scale * lo).numpy())
            cmax = self.b.const(base + "_hi", (scale * hi).numpy())
            x = self.b.op("Clip", [x, cmin, cmax], base + "_clip")
        dtype = {(4, False): self.tp.UINT4, (4, True): self.tp.INT4, (8, False): self.tp.UINT8, (8, True): self.tp.INT8}[(container, signed)]
        sname = self.b.const(base + "_scale", scale.numpy())
        zname = self.b.raw(base + "_zp", dtype, [], b"\x00")
        q = self.b.op("QuantizeLinear", [x, sname, zname], base + "_q")
        dq = self.b.op("DequantizeLinear", [q, sname, zname], base + "_dq")
        if four:
            self.qdq4.append((id(aq), x, dq))
        return dq

    def log2_act(self, aq: ActQuantizer, x: str, base: str) -> str:
        """`s * 2^-q`, `q = clamp(round(-log2(x/s)), 0, 2^b - 1)`, 0 where the rounded code is past the top (as
        `grids.log2_levels`). QuantizeLinear/DequantizeLinear only have uniform grids, so this is written with
        elementary ops (Div, Log, Round, Where, Clip, Pow): exact up to the float rounding of log2 itself."""
        b = self.b
        hi = float(2**aq.bits - 1)
        f32 = functools.partial(np.array, dtype=np.float32)
        scale = b.const(base + "_scale", aq.scale.detach().float().reshape(()).numpy())
        xs = b.op("Div", [x, scale], base + "_xs")
        neg_log2 = b.op("Neg", [b.op("Div", [b.op("Log", [xs], base + "_ln"), b.const(base + "_ln2", f32(math.log(2.0)))],
                                     base + "_log2")], base + "_nlog2")
        code = b.op("Where", [b.op("Greater", [xs, b.const(base + "_zero", f32(0.0))], base + "_pos"),
                              b.op("Round", [neg_log2], base + "_round"), b.const(base + "_inf", f32(np.inf))], base + "_code")
        clipped = b.op("Clip", [code, b.const(base + "_lo", f32(0.0)), b.const(base + "_hi", f32(hi))], base + "_clip")
        level = b.op("Pow", [b.const(base + "_two", f32(2.0)), b.op("Neg", [clipped], base + "_nq")], base + "_level")
        level = b.op("Where", [b.op("Greater", [code, b.const(base + "_top", f32(hi))], base + "_under"),
                               b.const(base + "_z", f32(0.0)), level], base + "_levels")
        return b.op("Mul", [level, scale], base + "_dq")

    def needs_wide(self) -> set[int]:
        """The quantizers in 4-bit pairs that onnxruntime would refuse: one whose QuantizeLinear reads, or whose
        DequantizeLinear feeds, an `INT4_REFUSED` op (looking through `INT4_PASS_THROUGH` ops)."""
        producer = {o: n for n in self.b.nodes for o in n.output}
        readers: dict[str, list[Any]] = defaultdict(list)
        for n in self.b.nodes:
            for i in n.input:
                readers[i].append(n)

        def source(name: str) -> Any:
            n = producer.get(name)
            while n is not None and n.op_type in INT4_PASS_THROUGH:
                n = producer.get(n.input[0])
            return n

        def sinks(name: str) -> set[str]:
            ops, todo = set(), [name]
            while todo:
                for n in readers[todo.pop()]:
                    ops.add(n.op_type)
                    if n.op_type in INT4_PASS_THROUGH:
                        todo.append(n.output[0])
            return ops

        return {aq for aq, q_in, dq in self.qdq4 if getattr(source(q_in), "op_type", None) in INT4_REFUSED or sinks(dq) & INT4_REFUSED}
