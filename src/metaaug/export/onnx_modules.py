"""ONNX for the modules a prepared graph calls (quantized layers, activations, norms, pooling), as a mixin of the
exporter; tensor functions and methods are in `onnx_ops`, the quantizers in `onnx_quant`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from metaaug.errors import ModelError
from metaaug.export.onnx_graph import _MODULE_UNARY, _Call, _pair, _Run
from metaaug.quant.layers import QuantLayer, QuantMatmul
from metaaug.quant.quantizers import ActQuantizer


class ModuleOps:
    def module(self, c: _Call, mod: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> Any:
        b, base = self.b, c.base
        if isinstance(mod, QuantMatmul):
            qa, qb = (self.act(q, self.t(v, base), f"{base}_{n}") for q, v, n in ((mod.qa, args[0], "qa"), (mod.qb, args[1], "qb")))
            return b.op("MatMul", [qa, qb], base)
        xr = args[0] if args else None
        if not isinstance(xr, _Run) or len(args) + len(kwargs) != 1:
            raise ModelError(f"ONNX export: module {type(mod).__name__} at '{base}' called with {len(args)} positional "
                             f"and {len(kwargs)} keyword arguments is not supported")
        x = self.t(xr, base)
        if isinstance(mod, QuantLayer):
            return self.layer(mod, xr, base)
        if isinstance(mod, ActQuantizer):
            return self.act(mod, x, base)
        if isinstance(mod, nn.Identity | nn.Dropout):
            return xr
        for cls, op_type in _MODULE_UNARY:
            if isinstance(mod, cls):
                return b.op(op_type, [x], base)
        if isinstance(mod, nn.ReLU6):
            return self.clip(x, 0.0, 6.0, base)
        if isinstance(mod, nn.LeakyReLU):
            return b.op("LeakyRelu", [x], base, alpha=float(mod.negative_slope))
        if isinstance(mod, nn.Hardsigmoid):
            return b.op("HardSigmoid", [x], base, alpha=1.0 / 6.0, beta=0.5)
        if isinstance(mod, nn.SiLU):
            return b.op("Mul", [x, b.op("Sigmoid", [x], base + "_sig")], base)
        if isinstance(mod, nn.GELU):
            return b.op("Gelu", [x], base, approximate=mod.approximate)
        if isinstance(mod, nn.Softmax) and mod.dim is not None:
            return b.op("Softmax", [x], base, axis=int(mod.dim))
        if isinstance(mod, nn.LayerNorm):
            return self.layer_norm(c, xr, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
        if isinstance(mod, nn.GroupNorm):
            return self.op_group_norm(c, xr, mod.num_groups, mod.weight, mod.bias, mod.eps)
        if isinstance(mod, nn.Flatten):
            return self.flatten(c, xr, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
            return self.global_pool(x, mod.output_size, isinstance(mod, nn.AdaptiveMaxPool2d), base)
        if isinstance(mod, nn.MaxPool2d | nn.AvgPool2d):
            return self.pool(mod, x, base)
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            ch = mod.num_features
            gamma = mod.weight.detach() if mod.affine else torch.ones(ch)
            beta = mod.bias.detach() if mod.affine else torch.zeros(ch)
            ins = [x] + [b.const(base + s, t.float().numpy()) for s, t in
                         (("_g", gamma), ("_b", beta), ("_m", mod.running_mean), ("_v", mod.running_var))]
            return b.op("BatchNormalization", ins, base, epsilon=float(mod.eps))
        raise ModelError(f"ONNX export: module {type(mod).__name__} at '{base}' is not supported")

    def layer(self, ql: QuantLayer, xr: _Run, base: str) -> str:
        layer, b = ql.layer, self.b
        x = self.t(xr, base)
        bias = b.const(base + "_bias", layer.bias.detach().float().numpy()) if layer.bias is not None else None
        if isinstance(layer, nn.Linear):
            if xr.rank == 2:
                return b.op("Gemm", [x, self.weight(ql, base)] + ([bias] if bias else []), base, transB=1)
            # Gemm is 2-D only: a Linear on (B, N, D) tokens is MatMul with the dequantized W^T, then the bias
            y = b.op("MatMul", [x, self.weight(ql, base, transpose=True)], base + ("_mm" if bias else ""))
            return b.op("Add", [y, bias], base) if bias else y
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ModelError(f"ONNX export: conv '{base}' uses padding {layer.padding!r}/{layer.padding_mode}; "
                             "only numeric zero padding is supported")
        pads = _pair(layer.padding)
        return b.op("Conv", [x, self.weight(ql, base)] + ([bias] if bias else []), base, kernel_shape=_pair(layer.kernel_size),
                    strides=_pair(layer.stride), pads=pads + pads, dilations=_pair(layer.dilation), group=int(layer.groups))

    def clip(self, x: str, lo: float, hi: float, base: str) -> str:
        return self.b.op("Clip", [x, self.b.const(base + "_lo", np.array(lo, np.float32)),
                                  self.b.const(base + "_hi", np.array(hi, np.float32))], base)

    def layer_norm(self, c: _Call, x: _Run, shape: Any, weight: Any, bias: Any, eps: float) -> str:
        dims = list(shape) if isinstance(shape, list | tuple | torch.Size) else [shape]
        scale = weight if weight is not None else torch.ones(dims)
        ins = [self.t(x, c.base), self.t(scale, c.base + "_g", torch.float32)]
        if bias is not None:
            ins.append(self.t(bias, c.base + "_b", torch.float32))
        return self.b.op("LayerNormalization", ins, c.base, axis=-len(dims), epsilon=float(eps))

    def op_group_norm(self, c: _Call, x: _Run, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5,
                      *_: Any) -> str:
        ch = x.values[0].shape[1]
        ins = [self.t(x, c.base)] + [self.t(v if v is not None else default, c.base + n, torch.float32)
                                     for v, default, n in ((weight, torch.ones(ch), "_g"), (bias, torch.zeros(ch), "_b"))]
        return self.b.op("GroupNormalization", ins, c.base, num_groups=int(num_groups), epsilon=float(eps))

    def flatten(self, c: _Call, x: _Run, start: int, end: int) -> str:
        rank = x.rank
        start, end = start % max(rank, 1), end % max(rank, 1)
        if start == 1 and end == rank - 1:
            return self.b.op("Flatten", [x.name], c.base, axis=1)
        dims = self.dims(x, c.base)
        return self.b.op("Reshape", [x.name, self.out_shape(c, [*dims[:start], -1, *dims[end + 1:]])], c.base)

    def global_pool(self, x: str, size: Any, is_max: bool, base: str) -> str:
        if size not in (1, (1, 1), [1, 1]):
            raise ModelError(f"ONNX export: adaptive pooling to {size} at '{base}' is not supported (only 1)")
        return self.b.op("GlobalMaxPool" if is_max else "GlobalAveragePool", [x], base)

    def pool(self, mod: nn.MaxPool2d | nn.AvgPool2d, x: str, base: str) -> str:
        pads = _pair(mod.padding)
        attrs: dict[str, Any] = {"kernel_shape": _pair(mod.kernel_size), "strides": _pair(mod.stride or mod.kernel_size),
                                 "pads": pads + pads, "ceil_mode": int(mod.ceil_mode)}
        if isinstance(mod, nn.MaxPool2d):
            if _pair(mod.dilation) != [1, 1] or mod.return_indices:
                raise ModelError(f"ONNX export: dilated or index-returning MaxPool2d at '{base}' is not supported")
            return self.b.op("MaxPool", [x], base, **attrs)
        if mod.divisor_override is not None:
            raise ModelError(f"ONNX export: AvgPool2d divisor_override at '{base}' is not supported")
        return self.b.op("AveragePool", [x], base, count_include_pad=int(mod.count_include_pad), **attrs)
