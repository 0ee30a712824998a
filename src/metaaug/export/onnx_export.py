"""QDQ ONNX export of a fake-quant model, built node by node from its FX graph, and its onnxruntime check.

The graph is written directly with `onnx.helper` rather than `torch.onnx.export` because the fake quantizers
are custom autograd functions with arbitrary integer ranges that no exporter maps to QuantizeLinear; here every
quantizer becomes an exact QDQ pair:

* weights: integer initializers (`uint4` for <= 4 bits, else `uint8`) holding `q = integer + z`, followed by a
  per-channel DequantizeLinear with the learned scale and zero-point, so the dequantized weight is bit-identical;
* activations: QuantizeLinear/DequantizeLinear with zero-point 0 in a `uint4`/`int4` (<= 4 bits) or `uint8`/`int8`
  container; widths below the container's are clipped exactly by a Clip to `[lo*s, hi*s]` before the pair. Which
  container: `ACT_CONTAINERS` (`auto` keeps 4 bits only where onnxruntime can take them, see `needs_wide`);
* log2-grid activations (post-softmax): elementary ops, since QuantizeLinear only has uniform grids.

Every FX node is also run in PyTorch on two "shadow" batches (sizes 2 and 3): that gives each tensor's rank and
dtype, folds everything that does not depend on the input (parameters, masks built with `arange`, static sizes)
into initializers, and tells which sizes follow the batch: those become Shape/Gather ops, so the exported graph
takes any batch size.

onnx/onnxruntime are imported inside the functions: they are an optional extra (`metaaug[onnx]`).
"""

from __future__ import annotations

import builtins
import functools
import math
import operator
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from metaaug.errors import ConfigError, ModelError
from metaaug.export.pack import pack_bits, uint_weights
from metaaug.quant.attention import masked_scores
from metaaug.quant.layers import QuantLayer, QuantMatmul
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import ActQuantizer
from metaaug.runs.files import atomic_path

OPSET = 21  # first opset with int4/uint4 QuantizeLinear/DequantizeLinear
BIAS_QUANT_PASS = "WeightBiasQuantization"
INSTALL_HINT = "ONNX export needs onnx and onnxruntime: pip install 'metaaug[onnx]'"
SHADOW_BATCHES = (2, 3)  # a size that differs between the two follows the batch
INT64_MAX = 2**63 - 1

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


def require_onnx() -> tuple[Any, Any]:
    """Import onnx and onnxruntime, or raise a one-line ConfigError telling how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return onnx, onnxruntime


def check_act_container(container: str) -> str:
    if container not in ACT_CONTAINERS:
        raise ConfigError(f"activation container must be one of {', '.join(ACT_CONTAINERS)}, got {container!r}")
    return container


class _Builder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self, onnx: Any) -> None:
        self.onnx, self.h, self.tp = onnx, onnx.helper, onnx.TensorProto
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._used: set[str] = set()

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        arr = np.asarray(array)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr) if arr.ndim else arr, name))
        return name

    def raw(self, base: str, dtype: int, dims: list[int], data: bytes) -> str:
        name = self.name(base)
        self.inits.append(self.h.make_tensor(name, dtype, dims, data, raw=True))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


@dataclass(eq=False)
class _Run:
    """A value computed when the ONNX graph runs: its name there and its values on the two shadow batches (tensors,
    or ints for a size that follows the batch, held in the graph as an int64 scalar)."""

    name: str
    values: tuple[Any, Any]

    @property
    def is_size(self) -> bool:
        return isinstance(self.values[0], int)

    @property
    def rank(self) -> int:
        return self.values[0].dim()


@dataclass
class _Call:
    """The node being exported: the base of its ONNX names and its values on the two shadow batches."""

    base: str
    outs: tuple[Any, Any]

    @property
    def out(self) -> Any:
        return self.outs[0]


def _has_run(v: Any) -> bool:
    if isinstance(v, _Run):
        return True
    if isinstance(v, list | tuple):
        return any(_has_run(a) for a in v)
    if isinstance(v, dict):
        return any(_has_run(a) for a in v.values())
    if isinstance(v, slice):
        return any(_has_run(a) for a in (v.start, v.stop, v.step))
    return False


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v, v]


def _function_name(target: Any) -> str | None:
    """The name a torch function or an ATen operator goes by (`torch.ops.aten.view.default` -> "view"); None for
    anything else (a user's function), which is then unsupported."""
    if target in _OPERATORS:
        return _OPERATORS[target]
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::", 1)[1] if target.namespace == "aten" else None
    module = getattr(target, "__module__", None) or ""
    return getattr(target, "__name__", None) if module == "torch" or module.startswith("torch.") else None


_OPERATORS = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.mul: "mul", operator.imul: "mul",
              operator.truediv: "div", operator.floordiv: "floordiv", operator.pow: "pow", operator.neg: "neg",
              operator.matmul: "matmul", operator.ge: "ge", operator.gt: "gt", operator.le: "le", operator.lt: "lt",
              operator.eq: "eq", operator.ne: "ne", operator.invert: "bitwise_not", masked_scores: "masked_scores"}
# torch functions, tensor methods and ATen operators that compute the same, by name
_ALIASES = {"view": "reshape", "_unsafe_view": "reshape", "true_divide": "div", "divide": "div", "multiply": "mul",
            "subtract": "sub", "_softmax": "softmax", "concat": "cat", "concatenate": "cat", "sym_size": "size",
            "clone": "contiguous", "detach": "contiguous", "alias": "contiguous", "lift_fresh_copy": "contiguous",
            "bmm": "matmul", "split_with_sizes": "split", "chunk": "split", "logical_not": "bitwise_not",
            "swapaxes": "transpose", "feature_dropout": "dropout", "greater_equal": "ge", "greater": "gt",
            "less_equal": "le", "less": "lt"}
_CHECKS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
                     "sym_constrain_range_for_size"})  # torch.export's run-time checks: nothing to compute
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow"}
_SIZE_OPS = {"add": "Add", "sub": "Sub", "mul": "Mul", "floordiv": "Div"}  # sizes are >= 0: truncation is floor
_COMPARE = {"ge": "GreaterOrEqual", "gt": "Greater", "le": "LessOrEqual", "lt": "Less", "eq": "Equal"}
_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "neg": "Neg", "exp": "Exp", "sqrt": "Sqrt", "erf": "Erf",
          "abs": "Abs", "log": "Log", "reciprocal": "Reciprocal", "hardswish": "HardSwish", "bitwise_not": "Not"}
_MODULE_UNARY: tuple[tuple[type[nn.Module], str], ...] = ((nn.ReLU, "Relu"), (nn.Sigmoid, "Sigmoid"), (nn.Tanh, "Tanh"),
                                                         (nn.Hardswish, "HardSwish"))


class _Exporter:
    def __init__(self, onnx: Any, container: str, wide: frozenset[int] = frozenset()) -> None:
        self.b = _Builder(onnx)
        self.tp = onnx.TensorProto
        self.container, self.wide = container, wide
        self.qdq4: list[tuple[int, str, str]] = []  # (id of the quantizer, its Q input, its DQ output) in 4-bit pairs
        self._consts: dict[tuple[int, Any], tuple[torch.Tensor, str]] = {}
        self._sizes: dict[tuple[str, int], _Run] = {}
        self._shapes: dict[str, str] = {}
        self.dtypes = {torch.float32: self.tp.FLOAT, torch.float64: self.tp.DOUBLE, torch.float16: self.tp.FLOAT16,
                       torch.int64: self.tp.INT64, torch.int32: self.tp.INT32, torch.bool: self.tp.BOOL}

    # ---- values -----------------------------------------------------------------------------------------
    def t(self, v: Any, base: str, dtype: torch.dtype | None = None) -> str:
        """The ONNX name of tensor operand `v` (a run-time value, or a constant made an initializer), as `dtype`."""
        if isinstance(v, _Run):
            if dtype is None or (v.values[0].dtype if not v.is_size else torch.int64) == dtype:
                return v.name
            return self.b.op("Cast", [v.name], base + "_cast", to=self._onnx_dtype(dtype, base))
        if isinstance(v, torch.Tensor):
            key = (id(v), dtype)
            if key not in self._consts:
                arr = v.detach().cpu().to(dtype or v.dtype).numpy()
                self._consts[key] = (v, self.b.const(base + "_c", arr))
            return self._consts[key][1]
        if isinstance(v, bool | int | float):
            return self.b.const(base + "_c", torch.tensor(v, dtype=dtype or torch.float32).numpy())
        raise ModelError(f"ONNX export: operand {v!r} at '{base}' is not supported")

    def _onnx_dtype(self, dtype: torch.dtype, base: str) -> int:
        if dtype not in self.dtypes:
            raise ModelError(f"ONNX export: dtype {dtype} at '{base}' is not supported")
        return self.dtypes[dtype]

    def ints(self, base: str, values: list[int]) -> str:
        return self.b.const(base, np.array(values, np.int64))

    def dims(self, x: _Run, base: str) -> list[int | _Run]:
        """The sizes of `x`: ints where both shadow batches agree, else a Shape/Gather of the running graph."""
        out: list[int | _Run] = []
        for i, (m, n) in enumerate(zip(x.values[0].shape, x.values[1].shape, strict=True)):
            if m == n:
                out.append(m)
                continue
            if (x.name, i) not in self._sizes:
                if x.name not in self._shapes:
                    self._shapes[x.name] = self.b.op("Shape", [x.name], base + "_shape")
                size = self.b.op("Gather", [self._shapes[x.name], self.b.const(base + "_i", np.array(i, np.int64))],
                                 base + "_size", axis=0)
                self._sizes[x.name, i] = _Run(size, (m, n))
            out.append(self._sizes[x.name, i])
        return out

    def ints1d(self, values: list[int | _Run], base: str) -> str:
        """A 1-D int64 tensor of static ints and run-time sizes (Unsqueeze + Concat where any size is dynamic)."""
        if all(isinstance(v, int) for v in values):
            return self.ints(base, values)  # type: ignore[arg-type]
        parts, run = [], []
        for v in values:
            if isinstance(v, _Run):
                if run:
                    parts.append(self.ints(base + "_c", run))
                    run = []
                parts.append(self.b.op("Unsqueeze", [v.name, self.ints(base + "_ax", [0])], base + "_u"))
            else:
                run.append(v)
        if run:
            parts.append(self.ints(base + "_c", run))
        return self.b.op("Concat", parts, base + "_shape", axis=0)

    def out_shape(self, c: _Call, requested: list[Any], dynamic_default: int | None = None) -> str:
        """The 1-D shape tensor for the node's output: its static sizes, and for those that follow the batch the
        requested entry (a run-time size, or -1 / `dynamic_default`)."""
        a, b = c.outs[0].shape, c.outs[1].shape
        if len(requested) != len(a):
            raise ModelError(f"ONNX export: shape {requested!r} at '{c.base}' does not match the output's rank {len(a)}")
        target = [m if m == n else r for m, n, r in zip(a, b, requested, strict=True)]
        if dynamic_default is not None:
            target = [dynamic_default if isinstance(v, int) and v == -1 else v for v in target]
        if sum(1 for v in target if isinstance(v, int) and v < 0) > 1:
            raise ModelError(f"ONNX export: shape {requested!r} at '{c.base}' has more than one unknown size")
        return self.ints1d(target, c.base)

    def wrap(self, out: Any, outs: tuple[Any, Any]) -> Any:
        """Pair each ONNX name in a handler's result with its shadow values."""
        if isinstance(out, str):
            return _Run(out, outs)
        if isinstance(out, list | tuple) and not isinstance(out, torch.Size):
            return type(out)(self.wrap(o, (a, b)) for o, a, b in zip(out, outs[0], outs[1], strict=True))
        return out

    def concrete(self, v: Any, k: int) -> Any:
        """`v` with every run-time value replaced by its value on shadow batch `k`."""
        if isinstance(v, _Run):
            return v.values[k]
        if isinstance(v, list | tuple) and not isinstance(v, torch.Size):
            return type(v)(self.concrete(a, k) for a in v)
        if isinstance(v, dict):
            return {key: self.concrete(a, k) for key, a in v.items()}
        if isinstance(v, slice):
            return slice(self.concrete(v.start, k), self.concrete(v.stop, k), self.concrete(v.step, k))
        return v

    # ---- quantizers -------------------------------------------------------------------------------------
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

    # ---- modules ----------------------------------------------------------------------------------------
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

    # ---- graphs -----------------------------------------------------------------------------------------
    def graph(self, gm: fx.GraphModule, inputs: list[Any], prefix: str) -> Any:
        """Emit the nodes of `gm` with its placeholders bound to `inputs`; returns its output value(s)."""
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if node.op == "output":
                return args[0]
            env[node] = self.node(node, modules, list(args), dict(kwargs), prefix + node.name, gm)
        raise ModelError("ONNX export: graph without output")

    def node(self, node: fx.Node, modules: dict[str, nn.Module], args: list[Any], kwargs: dict[str, Any], base: str,
             gm: fx.GraphModule) -> Any:
        mod = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, fx.GraphModule):
            return self.graph(mod, args, base + "_")
        if node.op == "get_attr":
            return functools.reduce(getattr, str(node.target).split("."), gm)
        if node.op not in ("call_module", "call_function", "call_method"):
            raise ModelError(f"ONNX export: graph node {node.op} '{node.name}' is not supported")
        outs = (self.execute(node, mod, args, kwargs, 0), self.execute(node, mod, args, kwargs, 1))
        if not _has_run((args, kwargs)):  # depends on no input: a constant (a ParamRef's value, a static size, a mask)
            return outs[0]
        c = _Call(base, outs)
        if node.op == "call_module":
            return self.wrap(self.module(c, mod, args, kwargs), outs)
        if node.op == "call_function" and node.target is operator.getitem:
            return self.wrap(self.getitem(c, *args), outs)
        if node.op == "call_function" and node.target is builtins.getattr:
            return self.attribute(c, *args)
        name = str(node.target) if node.op == "call_method" else _function_name(node.target)
        handler = self.handler(name)
        if handler is None:
            what = f"method .{node.target}()" if node.op == "call_method" else f"function {getattr(node.target, '__name__', node.target)}"
            raise ModelError(f"ONNX export: {what} at '{base}' is not supported")
        return self.wrap(handler(c, *args, **kwargs), outs)

    def execute(self, node: fx.Node, mod: nn.Module | None, args: list[Any], kwargs: dict[str, Any], k: int) -> Any:
        """The node's value on shadow batch `k`, computed by PyTorch."""
        a, kw = self.concrete(args, k), self.concrete(kwargs, k)
        if node.op == "call_module":
            return mod(*a, **kw)
        if node.op == "call_method":
            return getattr(a[0], str(node.target))(*a[1:], **kw)
        return node.target(*a, **kw)


def _export_pass(onnx: Any, qmodel: QuantModel, example: torch.Tensor, container: str, wide: frozenset[int]) -> tuple[_Exporter, _Run]:
    ex = _Exporter(onnx, container, wide)
    x = example[:1].float().cpu()
    shadows = tuple(x.expand(n, *x.shape[1:]).contiguous() for n in SHADOW_BATCHES)
    out = ex.graph(qmodel.gm, [_Run("input", shadows)], "")  # type: ignore[arg-type]
    if not isinstance(out, _Run) or out.is_size:
        raise ModelError("ONNX export: the model must return a single tensor")
    return ex, out


@torch.no_grad()
def build_onnx(qmodel: QuantModel, example: torch.Tensor, act_container: str = "auto") -> Any:
    """The QDQ `onnx.ModelProto` of `qmodel` for inputs shaped like `example` (batch dimension dynamic).

    With `act_container="auto"` the graph is built twice when needed: the first pass shows which 4-bit pairs
    onnxruntime would refuse, the second puts those in 8-bit containers.
    """
    onnx, _ = require_onnx()
    check_act_container(act_container)
    ex, out = _export_pass(onnx, qmodel, example, act_container, frozenset())
    wide = ex.needs_wide() if act_container == "auto" else set()
    if wide:
        ex, out = _export_pass(onnx, qmodel, example, act_container, frozenset(wide))
    h, tp = onnx.helper, onnx.TensorProto
    logits = ex.b.op("Identity", [out.name], "logits")
    shape = ["batch", *example.shape[1:]]
    graph = h.make_graph(ex.b.nodes, "metaaug_qdq", [h.make_tensor_value_info("input", tp.FLOAT, shape)],
                         [h.make_tensor_value_info(logits, tp.FLOAT, ["batch", *out.values[0].shape[1:]])], ex.b.inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="metaaug")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(qmodel: QuantModel, path: str | Path, example: torch.Tensor, act_int4: bool | None = None,
                act_container: str = "auto") -> Path:
    """Write the QDQ ONNX model. `act_int4` is the former switch: True is `act_container="auto"`, False is "int8"."""
    onnx, _ = require_onnx()
    if act_int4 is not None:
        act_container = "auto" if act_int4 else "int8"
    path = Path(path)
    model = build_onnx(qmodel.cpu().eval(), example, act_container)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def onnx_logits(path: str | Path, images: torch.Tensor, batch: int = 500, threads: int = 1, exact_bias: bool = True) -> torch.Tensor:
    """Run the exported model in onnxruntime (CPU, all graph optimizations).

    `exact_bias` turns off onnxruntime's WeightBiasQuantization pass, which rewrites each float Conv/Gemm bias
    of a QDQ graph into int32 at step `s_in * s_w`: a rounding the fake-quant model (and the graph's own
    semantics) do not have, and which moves logits by up to ~1 on these models.
    """
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    disabled = [BIAS_QUANT_PASS] if exact_bias else []
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    arr = images.float().cpu().numpy()
    outs = [sess.run(None, {"input": arr[i : i + batch]})[0] for i in range(0, len(arr), batch)]
    return torch.from_numpy(np.concatenate(outs))
