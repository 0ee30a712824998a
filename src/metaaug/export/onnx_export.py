"""QDQ ONNX export of a fake-quant model, built node by node from its FX graph, and its onnxruntime check.

The graph is written directly with `onnx.helper` rather than `torch.onnx.export` because the fake quantizers
are custom autograd functions with arbitrary integer ranges that no exporter maps to QuantizeLinear; here every
quantizer becomes an exact QDQ pair:

* weights: integer initializers (`uint4` for <= 4 bits, else `uint8`) holding `q = integer + z`, followed by a
  per-channel DequantizeLinear with the learned scale and zero-point, so the dequantized weight is bit-identical;
* activations: QuantizeLinear/DequantizeLinear with zero-point 0 in a `uint4`/`int4` (<= 4 bits) or `uint8`/`int8`
  container; widths below the container's are clipped exactly by a Clip to `[lo*s, hi*s]` before the pair.

onnx/onnxruntime are imported inside the functions: they are an optional extra (`metaaug[onnx]`).
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from metaaug.errors import ConfigError, ModelError
from metaaug.export.pack import pack_bits, uint_weights
from metaaug.quant.layers import QuantLayer
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import ActQuantizer
from metaaug.runs.files import atomic_path

OPSET = 21  # first opset with int4/uint4 QuantizeLinear/DequantizeLinear
BIAS_QUANT_PASS = "WeightBiasQuantization"
INSTALL_HINT = "ONNX export needs onnx and onnxruntime: pip install 'metaaug[onnx]'"


def require_onnx() -> tuple[Any, Any]:
    """Import onnx and onnxruntime, or raise a one-line ConfigError telling how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return onnx, onnxruntime


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
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def raw(self, base: str, dtype: int, dims: list[int], data: bytes) -> str:
        name = self.name(base)
        self.inits.append(self.h.make_tensor(name, dtype, dims, data, raw=True))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v, v]


class _Exporter:
    def __init__(self, onnx: Any, act_int4: bool) -> None:
        self.b = _Builder(onnx)
        self.tp = onnx.TensorProto
        self.act_int4 = act_int4

    # ---- quantizers -------------------------------------------------------------------------------------
    def weight(self, ql: QuantLayer, base: str) -> str:
        w = ql.layer.weight.detach()
        if not ql.quantize_weight:
            return self.b.const(base + "_w", w.float().numpy())
        wq = ql.wq
        q = uint_weights(wq, w)
        four = wq.bits <= 4
        dtype = self.tp.UINT4 if four else self.tp.UINT8
        qname = self.b.raw(base + "_wq", dtype, list(w.shape), pack_bits(q, 4 if four else 8).numpy().tobytes())
        zp = wq.zero_point.detach().round().to(torch.uint8).flatten()
        zname = self.b.raw(base + "_wzp", dtype, [zp.numel()], pack_bits(zp, 4 if four else 8).numpy().tobytes())
        sname = self.b.const(base + "_wscale", wq.scale.detach().float().flatten().numpy())
        return self.b.op("DequantizeLinear", [qname, sname, zname], base + "_wdq", axis=0)

    def act(self, aq: ActQuantizer, x: str, base: str) -> str:
        if not aq.enabled:
            return x
        lo, hi = aq.bounds
        signed = bool(aq.signed)
        scale = aq.scale.detach().float().reshape(())
        container = 4 if (self.act_int4 and aq.bits <= 4) else 8
        if aq.bits < container:
            cmin = self.b.const(base + "_lo", (scale * lo).numpy())
            cmax = self.b.const(base + "_hi", (scale * hi).numpy())
            x = self.b.op("Clip", [x, cmin, cmax], base + "_clip")
        dtype = {(4, False): self.tp.UINT4, (4, True): self.tp.INT4, (8, False): self.tp.UINT8, (8, True): self.tp.INT8}[(container, signed)]
        sname = self.b.const(base + "_scale", scale.numpy())
        zname = self.b.raw(base + "_zp", dtype, [], b"\x00")
        q = self.b.op("QuantizeLinear", [x, sname, zname], base + "_q")
        return self.b.op("DequantizeLinear", [q, sname, zname], base + "_dq")

    # ---- modules ----------------------------------------------------------------------------------------
    def module(self, mod: nn.Module, args: list[Any], base: str) -> Any:
        b, x = self.b, args[0] if args else None
        if isinstance(mod, fx.GraphModule):
            return self.graph(mod, args, base + "_")
        if isinstance(mod, QuantLayer):
            return self.layer(mod, x, base)
        if isinstance(mod, ActQuantizer):
            return self.act(mod, x, base)
        if isinstance(mod, nn.Identity | nn.Dropout):
            return x
        if isinstance(mod, nn.ReLU):
            return b.op("Relu", [x], base)
        if isinstance(mod, nn.ReLU6):
            return self.clip(x, 0.0, 6.0, base)
        if isinstance(mod, nn.LeakyReLU):
            return b.op("LeakyRelu", [x], base, alpha=float(mod.negative_slope))
        if isinstance(mod, nn.Sigmoid):
            return b.op("Sigmoid", [x], base)
        if isinstance(mod, nn.Tanh):
            return b.op("Tanh", [x], base)
        if isinstance(mod, nn.Hardswish):
            return b.op("HardSwish", [x], base)
        if isinstance(mod, nn.Hardsigmoid):
            return b.op("HardSigmoid", [x], base, alpha=1.0 / 6.0, beta=0.5)
        if isinstance(mod, nn.SiLU):
            return b.op("Mul", [x, b.op("Sigmoid", [x], base + "_sig")], base)
        if isinstance(mod, nn.GELU):
            return b.op("Gelu", [x], base, approximate=mod.approximate)
        if isinstance(mod, nn.Flatten):
            return self.flatten(x, mod.start_dim, mod.end_dim, base)
        if isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
            return self.global_pool(x, mod.output_size, isinstance(mod, nn.AdaptiveMaxPool2d), base)
        if isinstance(mod, nn.MaxPool2d | nn.AvgPool2d):
            return self.pool(mod, x, base)
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            c = mod.num_features
            gamma = mod.weight.detach() if mod.affine else torch.ones(c)
            beta = mod.bias.detach() if mod.affine else torch.zeros(c)
            ins = [x] + [b.const(base + s, t.float().numpy()) for s, t in
                         (("_g", gamma), ("_b", beta), ("_m", mod.running_mean), ("_v", mod.running_var))]
            return b.op("BatchNormalization", ins, base, epsilon=float(mod.eps))
        raise ModelError(f"ONNX export: module {type(mod).__name__} at '{base}' is not supported")

    def layer(self, ql: QuantLayer, x: str, base: str) -> str:
        layer, b = ql.layer, self.b
        ins = [x, self.weight(ql, base)]
        if layer.bias is not None:
            ins.append(b.const(base + "_bias", layer.bias.detach().float().numpy()))
        if isinstance(layer, nn.Linear):
            return b.op("Gemm", ins, base, transB=1)
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ModelError(f"ONNX export: conv '{base}' uses padding {layer.padding!r}/{layer.padding_mode}; "
                             "only numeric zero padding is supported")
        pads = _pair(layer.padding)
        return b.op("Conv", ins, base, kernel_shape=_pair(layer.kernel_size), strides=_pair(layer.stride),
                    pads=pads + pads, dilations=_pair(layer.dilation), group=int(layer.groups))

    def clip(self, x: str, lo: float, hi: float, base: str) -> str:
        return self.b.op("Clip", [x, self.b.const(base + "_lo", np.array(lo, np.float32)),
                                  self.b.const(base + "_hi", np.array(hi, np.float32))], base)

    def flatten(self, x: str, start: int, end: int, base: str) -> str:
        if start != 1 or end != -1:
            raise ModelError(f"ONNX export: flatten({start}, {end}) at '{base}' is not supported (only start_dim=1)")
        return self.b.op("Flatten", [x], base, axis=1)

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

    # ---- functions and graphs ---------------------------------------------------------------------------
    def operand(self, v: Any, base: str) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, int | float) and not isinstance(v, bool):
            return self.b.const(base + "_c", np.array(v, np.float32))
        raise ModelError(f"ONNX export: operand {v!r} at '{base}' is not supported")

    def function(self, node: fx.Node, args: list[Any], base: str) -> Any:
        t, b = node.target, self.b
        binary = {operator.add: "Add", torch.add: "Add", operator.iadd: "Add", operator.mul: "Mul", torch.mul: "Mul",
                  operator.sub: "Sub", torch.sub: "Sub", operator.truediv: "Div", torch.div: "Div"}
        if t is operator.getitem:
            return args[0][args[1]]
        if t in binary and len(args) == 2 and not node.kwargs:
            return b.op(binary[t], [self.operand(args[0], base), self.operand(args[1], base)], base)
        if t in (torch.relu, F.relu) and not node.kwargs.get("inplace"):
            return b.op("Relu", [args[0]], base)
        if t is F.relu6:
            return self.clip(args[0], 0.0, 6.0, base)
        if t in (torch.sigmoid, F.sigmoid):
            return b.op("Sigmoid", [args[0]], base)
        if t in (torch.tanh, F.tanh):
            return b.op("Tanh", [args[0]], base)
        if t is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(args[0], start, end, base)
        if t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            size = args[1] if len(args) > 1 else node.kwargs["output_size"]
            return self.global_pool(args[0], size, t is F.adaptive_max_pool2d, base)
        if t is torch.cat:
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return b.op("Concat", list(args[0]), base, axis=int(dim))
        raise ModelError(f"ONNX export: function {getattr(t, '__name__', t)} at '{base}' is not supported")

    def method(self, node: fx.Node, args: list[Any], base: str) -> Any:
        if node.target == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(args[0], start, end, base)
        if node.target == "relu":
            return self.b.op("Relu", [args[0]], base)
        if node.target in ("contiguous", "clone", "detach"):
            return args[0]
        raise ModelError(f"ONNX export: method .{node.target}() at '{base}' is not supported")

    def graph(self, gm: fx.GraphModule, inputs: list[Any], prefix: str) -> Any:
        """Emit the nodes of `gm` with its placeholders bound to `inputs`; returns its output value(s)."""
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)
        modules = dict(gm.named_modules())

        def val(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n])

        for node in gm.graph.nodes:
            base = prefix + node.name
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "output":
                return val(node.args[0])
            elif node.op == "call_module":
                env[node] = self.module(modules[node.target], list(val(node.args)), base)
            elif node.op == "call_function":
                env[node] = self.function(node, list(val(node.args)), base)
            elif node.op == "call_method":
                env[node] = self.method(node, list(val(node.args)), base)
            else:
                raise ModelError(f"ONNX export: graph node {node.op} '{node.name}' is not supported")
        raise ModelError("ONNX export: graph without output")


@torch.no_grad()
def build_onnx(qmodel: QuantModel, example: torch.Tensor, act_int4: bool = True) -> Any:
    """The QDQ `onnx.ModelProto` of `qmodel` for inputs shaped like `example` (batch dimension dynamic)."""
    onnx, _ = require_onnx()
    ex = _Exporter(onnx, act_int4)
    h, tp = onnx.helper, onnx.TensorProto
    out = ex.graph(qmodel.gm, ["input"], "")
    if not isinstance(out, str):
        raise ModelError("ONNX export: the model must return a single tensor")
    logits = ex.b.op("Identity", [out], "logits")
    shape = ["batch", *example.shape[1:]]
    n_out = qmodel.gm(example[:1].float().cpu()).shape[1:]
    graph = h.make_graph(ex.b.nodes, "metaaug_qdq", [h.make_tensor_value_info("input", tp.FLOAT, shape)],
                         [h.make_tensor_value_info(logits, tp.FLOAT, ["batch", *n_out])], ex.b.inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="metaaug")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(qmodel: QuantModel, path: str | Path, example: torch.Tensor, act_int4: bool = True) -> Path:
    onnx, _ = require_onnx()
    path = Path(path)
    model = build_onnx(qmodel.cpu().eval(), example, act_int4)
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
