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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from metaaug.errors import ConfigError, ModelError
from metaaug.export.onnx_graph import _MODULE_UNARY, _Builder, _Call, _function_name, _has_run, _pair, _Run
from metaaug.export.onnx_ops import TensorOps
from metaaug.export.pack import pack_bits, uint_weights
from metaaug.quant.layers import QuantLayer, QuantMatmul
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import ActQuantizer
from metaaug.runs.files import atomic_path

OPSET = 21  # first opset with int4/uint4 QuantizeLinear/DequantizeLinear
BIAS_QUANT_PASS = "WeightBiasQuantization"
INSTALL_HINT = "ONNX export needs onnx and onnxruntime: pip install 'metaaug[onnx]'"
SHADOW_BATCHES = (2, 3)  # a size that differs between the two follows the batch

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


class _Exporter(TensorOps):
    """Writes a prepared model's graph as ONNX: quantizers, modules and graphs here, tensor functions in `TensorOps`."""

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
