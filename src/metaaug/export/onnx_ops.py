"""ONNX handlers of tensor functions and methods, torch-level and ATen alike (found by name: `handler`), as a mixin
of the exporter: shape ops, arithmetic, comparisons, activations, reductions, masks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from metaaug.errors import ModelError
from metaaug.export.onnx_graph import _ALIASES, _BINARY, _CHECKS, _COMPARE, _SIZE_OPS, _UNARY, INT64_MAX, _Call, _has_run, _Run
from metaaug.quant.attention import masked_scores


class TensorOps:
    # ---- functions and methods (torch-level and ATen) ---------------------------------------------------
    def handler(self, name: str | None) -> Callable[..., Any] | None:
        if name is None:
            return None
        name = _ALIASES.get(name, name)
        if name in _CHECKS:
            return lambda c, *args, **kwargs: None
        if name in _BINARY or name == "floordiv":
            return functools.partial(self.binary, name)
        if name in _COMPARE:
            return functools.partial(self.compare, name)
        if name in _UNARY:
            return functools.partial(self.unary, name)
        return getattr(self, "op_" + name, None)

    def binary(self, name: str, c: _Call, a: Any, b: Any, alpha: Any = 1, rounding_mode: str | None = None) -> Any:
        if alpha != 1 or rounding_mode is not None:
            raise ModelError(f"ONNX export: {name} with alpha/rounding_mode at '{c.base}' is not supported")
        if isinstance(c.out, int):  # arithmetic on sizes that follow the batch
            if name not in _SIZE_OPS:
                raise ModelError(f"ONNX export: {name} of a batch-dependent size at '{c.base}' is not supported")
            ins = [self.t(v, c.base, torch.int64) for v in (a, b)]
            return self.b.op(_SIZE_OPS[name], ins, c.base)
        if name not in _BINARY or not isinstance(c.out, torch.Tensor):
            raise ModelError(f"ONNX export: function {name} at '{c.base}' is not supported")
        dtype = c.out.dtype  # torch computes in the promoted (result) dtype: cast every operand to it
        return self.b.op(_BINARY[name], [self.t(v, c.base, dtype) for v in (a, b)], c.base)

    def compare(self, name: str, c: _Call, a: Any, b: Any) -> str:
        dtype = torch.result_type(self.concrete(a, 0), self.concrete(b, 0))
        return self.b.op(_COMPARE[name], [self.t(v, c.base, dtype) for v in (a, b)], c.base)

    def op_ne(self, c: _Call, a: Any, b: Any) -> str:
        return self.b.op("Not", [self.compare("eq", c, a, b)], c.base + "_ne")

    def unary(self, name: str, c: _Call, x: Any, *args: Any, inplace: bool = False, **kwargs: Any) -> str:
        if inplace or args or kwargs:
            raise ModelError(f"ONNX export: {name} with extra arguments (inplace, ...) at '{c.base}' is not supported")
        op_type = _UNARY[name]
        if op_type == "Not" and x.values[0].dtype != torch.bool:
            op_type = "BitwiseNot"
        return self.b.op(op_type, [self.t(x, c.base)], c.base)

    def op_relu6(self, c: _Call, x: _Run, inplace: bool = False) -> str:
        return self.clip(self.t(x, c.base), 0.0, 6.0, c.base)

    def op_silu(self, c: _Call, x: _Run, inplace: bool = False) -> str:
        xn = self.t(x, c.base)
        return self.b.op("Mul", [xn, self.b.op("Sigmoid", [xn], c.base + "_sig")], c.base)

    def op_leaky_relu(self, c: _Call, x: _Run, negative_slope: float = 0.01, inplace: bool = False) -> str:
        return self.b.op("LeakyRelu", [self.t(x, c.base)], c.base, alpha=float(negative_slope))

    def op_gelu(self, c: _Call, x: _Run, approximate: str = "none") -> str:
        return self.b.op("Gelu", [self.t(x, c.base)], c.base, approximate=approximate)

    def op_softmax(self, c: _Call, x: _Run, dim: int | None = None, *_: Any, **__: Any) -> str:
        if dim is None:
            raise ModelError(f"ONNX export: softmax without dim at '{c.base}' is not supported")
        return self.b.op("Softmax", [self.t(x, c.base)], c.base, axis=int(dim))

    def op_layer_norm(self, c: _Call, x: _Run, normalized_shape: Any, weight: Any = None, bias: Any = None,
                      eps: float = 1e-5, *_: Any) -> str:
        return self.layer_norm(c, x, normalized_shape, weight, bias, eps)

    def op_dropout(self, c: _Call, x: _Run, p: float = 0.5, training: bool = False, inplace: bool = False) -> _Run:
        if training and p > 0:
            raise ModelError(f"ONNX export: dropout in training mode at '{c.base}' is not supported")
        return x

    def op_contiguous(self, c: _Call, x: _Run, *_: Any, **__: Any) -> _Run:
        return x

    def op_matmul(self, c: _Call, a: Any, b: Any) -> str:
        return self.b.op("MatMul", [self.t(v, c.base, c.out.dtype) for v in (a, b)], c.base)

    def op_size(self, c: _Call, x: _Run, dim: int | None = None) -> Any:
        dims = self.dims(x, c.base)
        return tuple(dims) if dim is None else dims[dim]

    def op_dim(self, c: _Call, x: _Run) -> int:
        return x.rank

    def attribute(self, c: _Call, x: Any, name: str) -> Any:
        if isinstance(x, _Run) and not x.is_size and name == "shape":
            return tuple(self.dims(x, c.base))
        if isinstance(x, _Run) and not x.is_size and name == "ndim":
            return x.rank
        if not _has_run(c.out) and not isinstance(c.out, torch.Tensor):  # dtype, device, ...
            return c.out
        raise ModelError(f"ONNX export: attribute .{name} at '{c.base}' is not supported")

    def op_reshape(self, c: _Call, x: _Run, *shape: Any) -> str:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], list | tuple) else shape
        return self.b.op("Reshape", [self.t(x, c.base), self.out_shape(c, list(shape))], c.base)

    def op_expand(self, c: _Call, x: Any, *sizes: Any, implicit: bool = False) -> str:
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], list | tuple) else sizes
        # ONNX Expand broadcasts: a 1 keeps the input's size, as -1 does in torch
        return self.b.op("Expand", [self.t(x, c.base), self.out_shape(c, list(sizes), dynamic_default=1)], c.base)

    def op_flatten(self, c: _Call, x: _Run, start_dim: int = 0, end_dim: int = -1) -> str:
        return self.flatten(c, x, start_dim, end_dim)

    def op_transpose(self, c: _Call, x: _Run, dim0: int, dim1: int) -> str:
        perm = list(range(x.rank))
        perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
        return self.b.op("Transpose", [x.name], c.base, perm=perm)

    def op_t(self, c: _Call, x: _Run) -> str:
        return self.op_transpose(c, x, 0, -1) if x.rank == 2 else x.name

    def op_permute(self, c: _Call, x: _Run, *dims: Any) -> str:
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], list | tuple) else dims
        return self.b.op("Transpose", [x.name], c.base, perm=[d % x.rank for d in dims])

    def op_unsqueeze(self, c: _Call, x: _Run, dim: int) -> str:
        return self.b.op("Unsqueeze", [x.name, self.ints(c.base + "_ax", [dim])], c.base)

    def op_squeeze(self, c: _Call, x: _Run, dim: Any = None) -> Any:
        dims = range(x.rank) if dim is None else dim if isinstance(dim, list | tuple) else [dim]
        a, b = x.values[0].shape, x.values[1].shape
        axes = sorted({d % x.rank for d in dims if a[d] == b[d] == 1})  # torch leaves other sizes as they are
        return self.b.op("Squeeze", [x.name, self.ints(c.base + "_ax", axes)], c.base) if axes else x

    def gather(self, x: str, index: Any, axis: int, base: str) -> str:
        idx = index.name if isinstance(index, _Run) else self.b.const(base + "_i", np.array(index, np.int64))
        return self.b.op("Gather", [x, idx], base, axis=axis)

    def slice(self, x: str, axis: int, start: Any, stop: Any, step: Any, base: str) -> str:
        ins = [self.ints1d([v], base + n) for v, n in ((0 if start is None else start, "_st"),
                                                        (INT64_MAX if stop is None else stop, "_en"))]
        return self.b.op("Slice", [x, *ins, self.ints(base + "_ax", [axis]), self.ints(base + "_sp", [1 if step is None else step])], base)

    def op_select(self, c: _Call, x: _Run, dim: int, index: Any) -> str:
        return self.gather(x.name, index, dim, c.base)

    def op_slice(self, c: _Call, x: _Run, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> str:
        return self.slice(x.name, dim, start, end, step, c.base)

    def op_unbind(self, c: _Call, x: _Run, dim: int = 0) -> list[str]:
        return [self.gather(x.name, i, dim, f"{c.base}_{i}") for i in range(len(c.out))]

    def op_split(self, c: _Call, x: _Run, sizes: Any, dim: int = 0) -> list[str]:
        """`split`/`chunk`: the pieces' extents along `dim` are those of the shadow outputs (they must not follow the batch)."""
        out, start = [], 0
        for i, (p, q) in enumerate(zip(c.outs[0], c.outs[1], strict=True)):
            if p.shape[dim] != q.shape[dim]:
                raise ModelError(f"ONNX export: splitting the batch dimension at '{c.base}' is not supported")
            out.append(self.slice(x.name, dim, start, start + p.shape[dim], 1, f"{c.base}_{i}"))
            start += p.shape[dim]
        return out

    def getitem(self, c: _Call, x: Any, idx: Any) -> Any:
        if isinstance(x, list | tuple):
            if _has_run(idx):
                raise ModelError(f"ONNX export: indexing a sequence by a run-time value at '{c.base}' is not supported")
            return x[idx]
        if not isinstance(x, _Run) or x.is_size:
            raise ModelError(f"ONNX export: indexing {type(x).__name__} at '{c.base}' is not supported")
        items = idx if isinstance(idx, tuple) else (idx,)
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        name, axis = x.name, 0
        for k, i in enumerate(items):
            base = f"{c.base}_{k}"
            if i is Ellipsis:
                axis += x.rank - consumed
            elif i is None:
                name = self.b.op("Unsqueeze", [name, self.ints(base + "_ax", [axis])], base)
                axis += 1
            elif isinstance(i, slice):
                if i != slice(None):
                    name = self.slice(name, axis, i.start, i.stop, i.step, base)
                axis += 1
            elif isinstance(i, int) or (isinstance(i, _Run) and i.is_size):
                name = self.gather(name, i, axis, base)
            else:
                raise ModelError(f"ONNX export: tensor indexing with {type(i).__name__} at '{c.base}' is not supported")
        return name if name != x.name else x

    def op_cat(self, c: _Call, tensors: list[Any], dim: int = 0) -> str:
        return self.b.op("Concat", [self.t(v, c.base, c.out.dtype) for v in tensors], c.base, axis=int(dim))

    def op_stack(self, c: _Call, tensors: list[Any], dim: int = 0) -> str:
        ax = self.ints(c.base + "_ax", [dim])
        parts = [self.b.op("Unsqueeze", [self.t(v, c.base, c.out.dtype), ax], f"{c.base}_{i}") for i, v in enumerate(tensors)]
        return self.b.op("Concat", parts, c.base, axis=int(dim))

    def reduce(self, op_type: str, c: _Call, x: _Run, dim: Any, keepdim: bool) -> str:
        dims = list(range(x.rank)) if dim is None else list(dim) if isinstance(dim, list | tuple) else [dim]
        return self.b.op(op_type, [self.t(x, c.base), self.ints(c.base + "_ax", dims)], c.base, keepdims=int(bool(keepdim)))

    def op_mean(self, c: _Call, x: _Run, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> str:
        return self.reduce("ReduceMean", c, x, dim, keepdim)

    def op_sum(self, c: _Call, x: _Run, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> str:
        return self.reduce("ReduceSum", c, x, dim, keepdim)

    def op_masked_fill(self, c: _Call, x: _Run, mask: Any, value: Any) -> str:
        dtype = c.out.dtype
        return self.b.op("Where", [self.t(mask, c.base, torch.bool), self.t(value, c.base, dtype), self.t(x, c.base, dtype)], c.base)

    def op_masked_scores(self, c: _Call, scores: _Run, mask: Any, heads: int, keep_true: bool) -> str:
        """An attention mask (`quant.attention.masked_scores`) known at export time, as the additive mask it amounts to
        (0 where attended, -inf or the float mask elsewhere): `s + 0 = s` and `s + -inf = -inf`, so it is exact."""
        try:
            bias = masked_scores(torch.zeros(1, *scores.values[0].shape[1:]), mask, heads, keep_true) if not _has_run(mask) else None
        except RuntimeError:  # a mask sized for one batch
            bias = None
        if bias is None:
            raise ModelError(f"ONNX export: an attention mask that depends on the input or the batch at '{c.base}' is not supported")
        return self.b.op("Add", [self.t(scores, c.base), self.t(bias, c.base, torch.float32)], c.base)

    def op_where(self, c: _Call, cond: Any, a: Any, b: Any) -> str:
        dtype = c.out.dtype
        return self.b.op("Where", [self.t(cond, c.base, torch.bool), self.t(a, c.base, dtype), self.t(b, c.base, dtype)], c.base)

    def op_adaptive_avg_pool2d(self, c: _Call, x: _Run, output_size: Any) -> str:
        return self.global_pool(self.t(x, c.base), output_size, False, c.base)

    def op_adaptive_max_pool2d(self, c: _Call, x: _Run, output_size: Any, return_indices: bool = False) -> str:
        if return_indices:
            raise ModelError(f"ONNX export: adaptive_max_pool2d with indices at '{c.base}' is not supported")
        return self.global_pool(self.t(x, c.base), output_size, True, c.base)
