"""QDQ ONNX export of a fake-quant model, built node by node from its FX graph, and its onnxruntime check.

The graph is written directly with `onnx.helper` rather than `torch.onnx.export` because the fake quantizers
are custom autograd functions with arbitrary integer ranges that no exporter maps to QuantizeLinear; here every
quantizer becomes an exact QDQ pair:

* weights: integer initializers (`uint4` for <= 4 bits, else `uint8`) holding `q = integer + z`, followed by a
  per-channel DequantizeLinear with the learned scale and zero-point, so the dequantized weight is bit-identical;
* activations: QuantizeLinear/DequantizeLinear with zero-point 0 in a `uint4`/`int4` (<= 4 bits) or `uint8`/`int8`
  container; widths below the container's are clipped exactly by a Clip to `[lo*s, hi*s]` before the pair. Which
  container: `onnx_quant.ACT_CONTAINERS` (`auto` keeps 4 bits only where onnxruntime can take them, see `needs_wide`);
* log2-grid activations (post-softmax): elementary ops, since QuantizeLinear only has uniform grids.

Every FX node is also run in PyTorch on two "shadow" batches (sizes 2 and 3): that gives each tensor's rank and
dtype, folds everything that does not depend on the input (parameters, masks built with `arange`, static sizes)
into initializers, and tells which sizes follow the batch: those become Shape/Gather ops, so the exported graph
takes any batch size.

The quantizers' ONNX is in `onnx_quant`, the modules' in `onnx_modules`, tensor functions' in `onnx_ops`, the
node builder and op tables in `onnx_graph`. onnx/onnxruntime are imported inside the functions: they are an optional
extra (`metaaug[onnx]`).
"""

from __future__ import annotations

import builtins
import functools
import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from metaaug.errors import ConfigError, ModelError
from metaaug.export.onnx_graph import _Builder, _Call, _function_name, _has_run, _Run
from metaaug.export.onnx_modules import ModuleOps
from metaaug.export.onnx_ops import TensorOps
from metaaug.export.onnx_quant import QuantizerOps, check_act_container
from metaaug.quant.prepare import QuantModel
from metaaug.runs.files import atomic_path

OPSET = 21  # first opset with int4/uint4 QuantizeLinear/DequantizeLinear
BIAS_QUANT_PASS = "WeightBiasQuantization"
INSTALL_HINT = "ONNX export needs onnx and onnxruntime: pip install 'metaaug[onnx]'"
SHADOW_BATCHES = (2, 3)  # a size that differs between the two follows the batch


def require_onnx() -> tuple[Any, Any]:
    """Import onnx and onnxruntime, or raise a one-line ConfigError telling how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return onnx, onnxruntime


class _Exporter(QuantizerOps, ModuleOps, TensorOps):
    """Writes a prepared model's graph as ONNX: values and the graph walk here, the quantizers in `QuantizerOps`,
    modules in `ModuleOps`, tensor functions and methods in `TensorOps`."""

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
