"""Graph passes of `prepare` for transformer pieces: which tensors GELUs read, activation-activation matmuls made
`QuantMatmul`s, and parameters read directly by the forward turned into module calls (`ParamRef`)."""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from metaaug.quant.layers import ParamRef, QuantMatmul
from metaaug.quant.quantizers import ActQuantizer

aten = torch.ops.aten
MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", aten.matmul.default, aten.bmm.default}
SOFTMAXES = {torch.softmax, F.softmax, "softmax", aten.softmax.int, aten._softmax.default}
GELUS = {F.gelu, "gelu", aten.gelu.default}


def _target_in(node: fx.Node, targets: set) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    try:
        return node.target in targets
    except TypeError:  # unhashable target
        return False


def is_gelu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.GELU)
    return _target_in(node, GELUS)


def quantized_readers(tensor: fx.Node, layers: set[fx.Node], modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The readers of `tensor` whose input is quantized: quantized layers, and GELUs (their input is a low-bit tensor
    in an integer pipeline too; RepQ-ViT and the ViT PTQ papers quantize it)."""
    return [u for u in tensor.users if u in layers or is_gelu(u, modules)]


def data_nodes(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Nodes whose value depends on the values of the model's input: not parameters, constants (a mask built with
    arange) or what only reads the input's shape (that mask expanded to the batch size)."""
    data: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder" or any(i in data for i in node.all_input_nodes if i.op != "get_attr" and not is_size(i)):
            data.add(node)
    return data


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
    paths = [p for p in paths if p]
    return paths[-1] if paths else ""


def _register(gm: fx.GraphModule, owner: str, base: str, module: nn.Module) -> str:
    """Add `module` as a child of the module at `owner` (the root if the capture kept no module there), uniquely named."""
    try:
        parent = gm.get_submodule(owner) if owner else gm
    except AttributeError:
        parent, base = gm, f"{owner.replace('.', '_')}_{base}"
        owner = ""
    name, i = base, 1
    while hasattr(parent, name):
        name, i = f"{base}{i}", i + 1
    parent.add_module(name, module)
    return f"{owner}.{name}" if owner else name


def insert_matmul_quantizers(gm: fx.GraphModule, bits: int, softmax_grid: str) -> list[str]:
    """Replace each matmul whose two inputs are activations by a `QuantMatmul` call; returns their module paths.

    An input produced by a softmax gets a quantizer on `softmax_grid` ("uniform" or "log2")."""
    act = data_nodes(gm.graph.nodes)
    paths = []
    for node in list(gm.graph.nodes):
        if not _target_in(node, MATMULS) or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in act and b in act):
            continue
        after_softmax = _target_in(a, SOFTMAXES)
        qa = ActQuantizer(bits, grid=softmax_grid) if after_softmax and softmax_grid != "uniform" else ActQuantizer(bits)
        role = "av" if after_softmax else "qk" if any(_target_in(u, SOFTMAXES) for u in _through_scaling(node)) else "matmul"
        qmm = QuantMatmul(qa, ActQuantizer(bits), role)
        path = _register(gm, _owner(node), f"{role}_matmul" if role != "matmul" else "matmul", qmm)
        qmm.path = path
        qa.consumers = [path]
        qmm.qb.consumers = [path]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (a, b))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        paths.append(path)
    return paths


def _through_scaling(node: fx.Node, depth: int = 4) -> list[fx.Node]:
    """Users of `node`, looking through up to `depth` elementwise steps (scale, mask) before a softmax."""
    out, frontier = [], list(node.users)
    for _ in range(depth):
        out.extend(frontier)
        frontier = [u for n in frontier if not _target_in(n, SOFTMAXES) for u in n.users]
    return out


def params_into_modules(gm: fx.GraphModule) -> int:
    """Turn every `get_attr` of a tensor into a call of a `ParamRef` holding it (moved there, so the state dict holds it
    once); returns how many. A tensor whose owner is also called as a module (tied weights) stays where it is."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    refs: dict[str, str] = {}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        owner_path, _, attr = str(node.target).rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, attr, None)
        if not isinstance(value, torch.Tensor) or owner_path in called:
            continue
        if node.target not in refs:
            delattr(owner, attr)
            refs[node.target] = _register(gm, "", "param_" + str(node.target).replace(".", "_"), ParamRef(value))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(refs[node.target], ())
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        count += 1
    return count


SHAPE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default}


def is_size(node: fx.Node) -> bool:
    """Reads a tensor's shape (`x.shape`, `x.size()`, an exported `sym_size`): depends on no value of the tensor."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel", "get_device")
    if node.op != "call_function":
        return False
    if node.target is builtins.getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim", "device", "dtype", "layout", "is_cuda"):
        return True
    return node.target in SHAPE_OPS


def batch_free(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is not a batch of data: shape reads and what is computed from them, parameters, and constants
    (an attention mask built with `arange` and expanded to the batch size). A unit must compute these itself: it runs
    on batches of its cached inputs, so a size or a mask cached for the whole calibration set would be wrong there."""
    free: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        computed = node.op in ("call_function", "call_method") and all(i in free for i in inputs)  # arange: no inputs
        if (is_size(node) or node.op == "get_attr" or (node.op == "call_module" and not inputs) or computed) and not _edited(node):
            free.add(node)
    return free


def _in_place(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and (name.endswith("_") or node.target is operator.setitem)


def _edited(node: fx.Node) -> bool:
    """An in-place op changes this value later (`mask.fill_diagonal_(...)`): copying the value elsewhere would lose it."""
    return any(_in_place(u) for u in node.users) or _in_place(node)


def localize_constants(graph: fx.Graph, unit_of: dict[fx.Node, int]) -> int:
    """Copy into each unit the batch-free values (`batch_free`) it reads from another unit, so that only batches of
    data pass between units. Returns how many nodes were copied."""
    shapes = batch_free(graph)
    copies: dict[tuple[fx.Node, int], fx.Node] = {}

    def copy_into(node: fx.Node, unit: int, before: fx.Node) -> fx.Node:
        if node not in shapes or unit_of.get(node) == unit:
            return node
        if (node, unit) not in copies:
            args = fx.node.map_arg(node.args, lambda a: copy_into(a, unit, before))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: copy_into(a, unit, before))
            with graph.inserting_before(before):
                new = graph.create_node(node.op, node.target, args, kwargs)
            new.meta = dict(node.meta)
            unit_of[new] = unit
            shapes.add(new)
            copies[node, unit] = new
        return copies[node, unit]

    for node in list(graph.nodes):
        if node not in unit_of:
            continue
        for inp in node.all_input_nodes:
            if inp in shapes and unit_of.get(inp) != unit_of[node]:
                node.replace_input_with(inp, copy_into(inp, unit_of[node], node))
    for node in reversed(list(graph.nodes)):
        if node in shapes and not node.users and not node.is_impure():
            graph.erase_node(node)
            unit_of.pop(node, None)
    return len(copies)


UNFOLDED_BN = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
FLOAT_LAYERS = {aten.linear.default, aten.conv2d.default, aten.conv1d.default, aten.conv2d.padding}


def warn_unhandled_ops(gm: fx.GraphModule, fold_bn: bool) -> None:
    """Say what a torch.export capture leaves as it is: BatchNorm not folded, and weight layers that could not be
    mapped back to a Conv2d/Linear module (they stay in float)."""
    from metaaug.errors import warn

    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    bns = [n.name for n in ops if _target_in(n, UNFOLDED_BN)]
    left = [n.name for n in ops if _target_in(n, FLOAT_LAYERS)]
    if fold_bn and bns:
        warn(f"{len(bns)} BatchNorm op(s) in the exported graph (e.g. {bns[0]}) are not folded into their convs; "
             "they run in float after the quantized conv")
    if left:
        warn(f"{len(left)} conv/linear op(s) (e.g. {left[0]}) are not Conv2d/Linear modules metaaug can wrap; they stay in float")
