"""Capture a model's forward as an FX graph: `torch.fx.symbolic_trace` first, `torch.export` where fx cannot trace.

Both give the graph `prepare` works on. The exported graph is ATen-level; its Conv2d/Linear calls are turned back
into calls of the model's own modules (by the module path of their weight), so the two routes quantize the same
layers under the same names. Before capture, attention is decomposed (`quant.attention`) so that QK^T and attn.V
are explicit matmuls, and the forward's result is reduced to one logits tensor by one rule (`output_logits`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from metaaug.errors import ModelError
from metaaug.quant.attention import decompose_attention, sdpa_math

ATEN_LAYERS = {torch.ops.aten.linear.default: nn.Linear, torch.ops.aten.conv2d.default: nn.Conv2d}
OUTPUT_RULE = ("the model's forward must return a logits tensor, a dict or ModelOutput with a 'logits' entry, "
               "or a tuple/list whose first item is the logits")


def output_logits(out: object) -> torch.Tensor:
    """The one output rule: a tensor is the logits; a dict or `ModelOutput` gives its 'logits' entry (else its first
    tensor); a tuple or list gives its first item. Works on graph values (fx nodes) as on tensors."""
    if isinstance(out, torch.Tensor | fx.Proxy | fx.Node):
        return out
    if isinstance(out, Mapping) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
        if "logits" in out:
            return output_logits(out["logits"])
        for key in out:
            if isinstance(out[key], torch.Tensor | fx.Proxy | fx.Node):
                return out[key]
    if isinstance(out, tuple | list) and out:
        return output_logits(out[0])
    raise ModelError(f"forward() returned {type(out).__name__}; {OUTPUT_RULE}")


def _with_logits(model: nn.Module) -> None:
    """Make `model`'s forward return `output_logits(...)` of its result (class swap, so module paths stay as they are)."""
    cls = type(model)
    if getattr(cls, "_metaaug_logits", False):
        return

    def forward(self, x):  # one input, the images: the signature torch.export sees
        return output_logits(cls.forward(self, x))

    model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "_metaaug_logits": True, "__module__": cls.__module__})


@contextlib.contextmanager
def _sdpa_as_matmuls() -> Iterator[None]:
    """While capturing, `F.scaled_dot_product_attention` is the math formula (two matmuls and a softmax)."""
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa_math
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


class _Tracer(fx.Tracer):
    """torch.fx's tracer, except that a torch.nn module with children (nn.TransformerEncoder(Layer)) is traced through
    instead of kept whole: its Linear layers must be reached to be quantized."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) and not any(True for _ in m.children())


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """nn.TransformerEncoderLayer's fused fast path would bypass the decomposed attention."""
    saved = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


Example = torch.Tensor | Callable[[], torch.Tensor] | None


def example_input(model: nn.Module, example: Example) -> torch.Tensor | None:
    """An input batch for torch.export: `example` (called if it is a function, so data loads only when needed), else one
    from a Hugging Face model's config (`num_channels`, `image_size`)."""
    if callable(example):
        example = example()
    if example is not None:
        example = example[:2].detach()
        if len(example) < 2:  # a batch of one would make torch.export fix the batch size at 1
            example = example.expand(2, *example.shape[1:])
        param = next(iter(model.parameters()), None)
        return example if param is None else example.to(param.device)
    cfg = getattr(model, "config", None)
    size, channels = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", None)
    if isinstance(channels, int) and isinstance(size, int | list | tuple):
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return torch.zeros(2, channels, *hw)
    return None


def capture(model: nn.Module, example: Example = None) -> fx.GraphModule:
    """The model's forward as a GraphModule whose Conv2d/Linear are `call_module` nodes and whose output is one tensor.

    `model` is modified in place (attention decomposed, forward reduced to logits): pass a copy. `example` is used
    only when torch.fx cannot trace the model.
    """
    decompose_attention(model)
    with _sdpa_as_matmuls(), _no_mha_fastpath():
        try:
            gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
        except Exception as exc:
            fx_reason = _first_line(exc)
        else:
            out = next(n for n in gm.graph.nodes if n.op == "output")
            out.args = (output_logits(out.args[0]),)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            return gm
        _with_logits(model)
        example = example_input(model, example)
        if example is None:
            raise ModelError(f"{type(model).__name__} cannot be traced by torch.fx ({fx_reason}); torch.export can capture it "
                             "from an example input: pass example=images[:2] to prepare()") from None
        try:
            # the batch dimension stays symbolic: units run on batches of any size
            ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
        except Exception as exc:
            raise ModelError(f"{type(model).__name__} cannot be captured by torch.fx ({fx_reason}) nor by torch.export "
                             f"({_first_line(exc)})") from None
    gm = ep.module()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    gm.graph.set_codegen(fx.graph.CodeGen())  # plain call convention: one image tensor in, the logits out
    out.args = (output_logits(out.args[0]),)
    gm = _modules_back(gm, model)
    gm.meta["input_shape"] = tuple(example.shape[1:])  # a rebuild (packed file, run folder) captures it again from this
    return gm


def _modules_back(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Turn an exported graph's `aten.linear`/`aten.conv2d` on a module's weight back into a call of that module."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    modules = dict(model.named_modules())
    for node in list(graph.nodes):
        kind = ATEN_LAYERS.get(node.target) if node.op == "call_function" else None
        weight = node.args[1] if kind is not None and len(node.args) > 1 else None
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        path = str(weight.target).rpartition(".")[0]
        layer = modules.get(path)
        if not isinstance(layer, kind) or not _same_call(node, layer):
            continue
        _set_module(gm, path, layer)
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _same_call(node: fx.Node, layer: nn.Module) -> bool:
    """The exported call uses the module's own bias (and for a conv its stride/padding/...), so calling the module
    computes exactly the same."""
    args = list(node.args) + [None] * 7
    bias = args[2]
    has_bias = isinstance(bias, fx.Node) and bias.op == "get_attr"
    if (layer.bias is not None) != has_bias:
        return False
    if isinstance(layer, nn.Conv2d):
        def pair(v, default):
            v = default if v is None else v
            return tuple(v) if isinstance(v, list | tuple) else (v, v)
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return False
        return (pair(args[3], 1), pair(args[4], 0), pair(args[5], 1), args[6] or 1) == (
            tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)
    return True


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    setattr(owner, attr, module)
