"""Reconstruction units found from the traced graph, whatever the model's classes are called.

A residual (or concatenation, or gating) block is the region between a tensor and the join (`add`, `cat`,
`mul`, ...) that all of its paths meet at: the join's immediate dominator is where the block forks. Chains of
layers outside such regions are grouped by the module that owns them (a `Sequential` child, a block class
without a skip, with the squeeze-excitation gates inside it: EfficientNet's MBConv without a skip) or left as
single layers. Module names only label what the graph found; a multi-layer module that still ends up in pieces
is named in a warning, since it most likely was meant as one block.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from metaaug.errors import ConfigError, ModelError, warn
from metaaug.quant.graph_ops import data_nodes, is_size

JOINS: dict[object, str] = {
    operator.add: "residual", torch.add: "residual", "add": "residual", operator.sub: "residual", torch.sub: "residual",
    "sub": "residual", operator.iadd: "residual", torch.cat: "concat", torch.concat: "concat", torch.stack: "concat",
    operator.mul: "gate", torch.mul: "gate", "mul": "gate",
    # the same joins in a torch.export (ATen) graph
    torch.ops.aten.add.Tensor: "residual", torch.ops.aten.sub.Tensor: "residual", torch.ops.aten.cat.default: "concat",
    torch.ops.aten.stack.default: "concat", torch.ops.aten.mul.Tensor: "gate",
}
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid,
                       nn.Tanh, nn.Identity, nn.Dropout)
ELEMENTWISE_FUNCS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu,
                     torch.nn.functional.silu, torch.nn.functional.hardswish, torch.nn.functional.hardtanh, torch.sigmoid,
                     torch.tanh, "relu", "relu_", "sigmoid", "tanh", "clamp", torch.ops.aten.relu.default, torch.ops.aten.gelu.default,
                     torch.ops.aten.silu.default, torch.ops.aten.sigmoid.default, torch.ops.aten.hardtanh.default,
                     torch.ops.aten.hardswish.default, torch.ops.aten.clamp.default}
BLOCK_KINDS = ("residual", "concat", "module", "module+gate", "named")  # units that are whole blocks, not pieces


@dataclass
class UnitPlan:
    """One reconstruction unit: its name (a module path where one module holds exactly it), how it was found
    (`residual`, `concat`, `gate`: a graph region; `module`: a chain grouped by its owner; `module+gate`: a chain
    and the gates inside it (squeeze-excitation) grouped by their owner, a block without a skip; `layer`: a lone
    layer; `named`: given with `--units`) and the quantized layers it holds."""

    name: str
    found: str
    layers: list[str] = field(default_factory=list)


def check_unit_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    paths = dict(model.named_modules())
    names = list(names)
    unknown = [n for n in names if n not in paths]
    if unknown:
        raise ConfigError(f"unit {unknown[0]!r} is not a submodule of the model")
    return names


def _stack(node: fx.Node) -> list[str]:
    """Module paths that own `node`, outermost first (the root excluded: torch.export lists it as '')."""
    stack = node.meta.get("nn_module_stack") or {}
    return [p for p in (v[0] if isinstance(v, tuple) else k for k, v in stack.items()) if p]


def _is_join(node: fx.Node, data: set[fx.Node]) -> str | None:
    if node.op not in ("call_function", "call_method") or len([i for i in _inputs(node) if i in data]) < 2:
        return None
    try:
        return JOINS.get(node.target)
    except TypeError:  # unhashable target
        return None


def _inputs(node: fx.Node) -> list[fx.Node]:
    """Data inputs: constants, parameters (get_attr) and shape reads (an all-true mask expanded to the batch size) do
    not make a fork."""
    return [n for n in node.all_input_nodes if n.op != "get_attr" and not is_size(n)]


def _immediate_dominators(nodes: list[fx.Node], order: dict[fx.Node, int], data: set[fx.Node]) -> dict[fx.Node, fx.Node | None]:
    """Cooper-Harvey-Kennedy on a DAG in topological order; None is the virtual root above the inputs. Only data
    inputs are edges: a constant mask read by every block would otherwise make the root every block's fork."""
    idom: dict[fx.Node, fx.Node | None] = {}
    for node in nodes:
        preds = [p for p in _inputs(node) if p in idom and p in data]
        if not preds:
            idom[node] = None
            continue
        cur: fx.Node | None = preds[0]
        for p in preds[1:]:
            a, b = cur, p
            while a is not b and a is not None and b is not None:
                while a is not None and b is not None and order[a] > order[b]:
                    a = idom[a]
                while a is not None and b is not None and order[b] > order[a]:
                    b = idom[b]
            cur = a if a is b else None
        idom[node] = cur
    return idom


def _region(join: fx.Node, fork: fx.Node, order: dict[fx.Node, int], data: set[fx.Node]) -> set[fx.Node]:
    """Every data node on a path from `fork` (excluded) to `join` (included)."""
    out, todo = set(), [join]
    while todo:
        n = todo.pop()
        if n in out or n is fork or order[n] <= order[fork] or n not in data:
            continue
        out.add(n)
        todo.extend(_inputs(n))
    return out


def _is_elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), ELEMENTWISE_MODULES)
    if node.op in ("call_function", "call_method"):
        try:
            return node.target in ELEMENTWISE_FUNCS
        except TypeError:
            return False
    return False


class UnitFinder:
    """Splits a prepared graph (layers wrapped, activation quantizers inserted) into reconstruction units."""

    def __init__(self, gm: fx.GraphModule, is_layer: Callable[[fx.Node], bool],
                 producer_of: Callable[[fx.Node], fx.Node | None]) -> None:
        self.gm, self.is_layer, self.producer_of = gm, is_layer, producer_of
        self.modules = dict(gm.named_modules())
        self.nodes = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr")]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.layers = [n for n in self.nodes if is_layer(n)]
        self.layer_paths = {n: str(n.target) for n in self.layers}
        self.data = data_nodes(self.nodes)

    def owner(self, nodes: Iterable[fx.Node]) -> str:
        """The deepest module whose forward produced all of `nodes` ('' for the root); quantizer nodes do not count."""
        common: list[str] | None = None
        for n in nodes:
            if self.producer_of(n) is not None:
                continue
            stack = _stack(n)
            common = stack if common is None else [a for a, b in zip(common, stack, strict=False) if a == b]
        return common[-1] if common else ""

    def module_layers(self, path: str) -> set[str]:
        """Quantized layers that a module owns."""
        return {p for p in self.layer_paths.values() if path == "" or p == path or p.startswith(path + ".")}

    def _name(self, layers: set[str], owner: str) -> str | None:
        """The outermost module that holds exactly `layers`, searched from `owner` upwards."""
        best, path = None, owner
        while path and self.module_layers(path) == layers:
            best, path = path, path.rpartition(".")[0]
        return best

    # ---- graph regions ------------------------------------------------------------------------------
    def regions(self) -> list[tuple[set[fx.Node], str]]:
        idom = _immediate_dominators(self.nodes, self.order, self.data)
        found: list[tuple[set[fx.Node], str]] = []
        for node in self.nodes:
            kind = _is_join(node, self.data)
            fork = idom.get(node) if kind else None
            if fork is None:
                continue
            region = _region(node, fork, self.order, self.data)
            if any(self.is_layer(n) for n in region):
                found.append((region, kind))
        merged: list[tuple[set[fx.Node], str]] = []
        for region, kind in found:  # nested or overlapping regions become one (e.g. a gate inside a residual)
            overlaps = [m for m in merged if m[0] & region]
            for m in overlaps:
                merged.remove(m)
                region = region | m[0]
                kind = m[1] if m[1] == "residual" else kind
            merged.append((region, kind))
        for region, _ in merged:
            self._extend(region)
        merged.sort(key=lambda r: min(self.order[n] for n in r[0]))
        return self._merge_by_owner(merged)

    def _extend(self, region: set[fx.Node]) -> None:
        """Add what the owning module computes around the region, and the activation right after the join."""
        owner = self.owner(region)
        layers = {self.layer_paths[n] for n in region if n in self.layer_paths}
        if owner and self.module_layers(owner) == layers:
            region.update(n for n in self.nodes if owner in _stack(n))
        while True:
            last = max(region, key=self.order.__getitem__)
            users = [u for u in last.users if u.op != "output"]
            if len(users) != 1 or not _is_elementwise(users[0], self.modules) or users[0] in region:
                break
            region.add(users[0])

    def _merge_by_owner(self, regions: list[tuple[set[fx.Node], str]]) -> list[tuple[set[fx.Node], str]]:
        """Consecutive regions that the same module computes (a dense block's concatenations) become one unit.

        Regions in modules of their own (ResNet blocks in a stage) stay apart: their owners differ.
        """
        out: list[tuple[set[fx.Node], str]] = []
        for region, kind in regions:
            if out and (owner := self.owner(region)) and self.owner(out[-1][0]) == owner:
                out[-1] = (out[-1][0] | region, out[-1][1])
            else:
                out.append((region, kind))
        return out

    # ---- the plan ------------------------------------------------------------------------------------
    def plan(self, mode: str | list[str]) -> tuple[dict[fx.Node, int], list[UnitPlan]]:
        """Unit index per compute node and the units, for `mode` 'block', 'layer' or a list of module paths."""
        if isinstance(mode, list):
            return self._assign(lambda n: next((p for p in _stack(n) if p in set(mode)), None), {p: "named" for p in mode})
        if mode == "layer":
            return self._assign(lambda n: None, {})
        node_unit: dict[fx.Node, str] = {}
        kinds: dict[str, str] = {}
        in_region: set[str] = set()
        gates: list[tuple[str, set[fx.Node], set[str], str]] = []  # name, nodes, layers, owner of each gate region
        for region, kind in self.regions():
            layers = {self.layer_paths[n] for n in region if n in self.layer_paths}
            owner = self.owner(region)
            ordered = [self.layer_paths[n] for n in self.layers if self.layer_paths[n] in layers]  # graph order
            name = self._name(layers, owner) or f"{ordered[0]}..{ordered[-1]}"
            kinds[name] = kind
            in_region |= layers
            node_unit.update({n: name for n in region})
            if kind == "gate":
                gates.append((name, region, layers, owner))
        groups = self._chain_groups(in_region, [(layers, owner) for _, _, layers, owner in gates])
        for group, absorbed in groups.items():
            kinds[group] = "module+gate" if absorbed else "module"
            for i in absorbed:  # the gate's nodes now belong to the module's unit
                name, region, _, _ = gates[i]
                kinds.pop(name, None)
                node_unit.update({n: group for n in region})

        def unit_name(n: fx.Node) -> str | None:
            if n in node_unit:
                return node_unit[n]
            return next((p for p in _stack(n) if p in groups), None)

        unit_of, plans = self._assign(unit_name, kinds)
        self._warn_split(plans)
        return unit_of, plans

    def _chain_groups(self, in_region: set[str], gates: list[tuple[set[str], str]]) -> dict[str, list[int]]:
        """Modules that own a run of two or more layers outside every region, and nothing else but whole gate
        regions computed inside them (an SE block within a block without a skip), each with the gates it takes.

        Only gates are taken: a module holding a residual or concat block is a stage of blocks, not one block.
        """
        groups: dict[str, list[int]] = {}
        free = {p for p in self.layer_paths.values() if p not in in_region}
        for node in self.layers:
            path = self.layer_paths[node]
            if path not in free or any(g == path or path.startswith(g + ".") for g in groups):
                continue
            for anc in reversed(_stack(node)[:-1]):  # innermost first, the layer itself excluded
                owned = self.module_layers(anc)
                inside = [i for i, (layers, owner) in enumerate(gates) if layers & owned]
                whole = all(gates[i][0] <= owned and (gates[i][1] == anc or gates[i][1].startswith(anc + "."))
                            for i in inside)
                if not whole or not owned <= free.union(*(gates[i][0] for i in inside)):
                    break
                if len(owned) > 1:
                    groups[self._name(owned, anc) or anc] = inside
                    break
        return groups

    def _warn_split(self, plans: list[UnitPlan]) -> None:
        """Warn once about modules with two or more layers left in pieces: lone layers, gates and regions that no
        module holds, with no found block among them. Such a module was most likely meant as one block; a stage
        of found blocks (a ResNet layer, MobileNet's features) is not split in this sense."""
        unit_of = {layer: i for i, p in enumerate(plans) for layer in p.layers}
        called = {p for n in self.layers for p in _stack(n) if p != self.layer_paths[n]}
        split: list[tuple[str, list[str]]] = []
        seen: list[set[str]] = []
        for path in sorted(called, key=lambda p: (-p.count("."), p)):  # innermost first: report the smallest
            layers = self.module_layers(path)
            pieces = [plans[i] for i in sorted({unit_of[p] for p in layers if p in unit_of})]
            if len(layers) < 2 or len(pieces) < 2 or any(s <= layers for s in seen):
                continue
            if any(p.found in BLOCK_KINDS and p.name in self.modules for p in pieces):
                continue
            if not any(p.found == "layer" or p.name not in self.modules for p in pieces):
                continue  # gated blocks side by side
            seen.append(layers)
            while (parent := path.rpartition(".")[0]) in called and self.module_layers(parent) == layers:
                path = parent  # the outermost module that runs exactly these layers: --units matches what runs
            split.append((path, [p.name for p in pieces]))
        if not split:
            return
        rank = {path: i for i, path in enumerate(self.layer_paths[n] for n in self.layers)}
        split.sort(key=lambda s: min(rank[p] for p in self.module_layers(s[0])))  # in graph order
        if len(split) == 1:
            name, units = split[0]
            warn(f"module '{name}' has {len(self.module_layers(name))} quantized layers but is split across "
                 f"{len(units)} units ({', '.join(units)}); to reconstruct it as one unit name it with --units {name} "
                 f"(API: units=['{name}']) together with the other blocks you want: named units replace the ones found")
            return
        shown = [name for name, _ in split[:5]]
        more = f" and {len(split) - 5} more" if len(split) > 5 else ""
        warn(f"{len(split)} modules with several quantized layers are split across units: "
             f"{', '.join(f'{n!r} ({len(u)} units)' for n, u in split[:5])}{more}; to reconstruct each as one unit name "
             f"them with --units {','.join(shown)}{',...' if more else ''} (API: units=[...]) together with the other "
             "blocks you want: named units replace the ones found")

    def _assign(self, unit_name: Callable[[fx.Node], str | None], kinds: dict[str, str]) -> tuple[dict[fx.Node, int], list[UnitPlan]]:
        """Give each compute node a unit index, in topological order.

        Nodes of a named/found unit form that unit; every other quantized layer is a unit of its own, followed by
        the parameter-free nodes after it (activation, pooling). Glue after a block (pool, flatten) joins the
        next unit. A quantizer node joins the unit of the tensor it quantizes.
        """
        unit_of: dict[fx.Node, int] = {}
        plans: list[UnitPlan] = []
        pending: list[fx.Node] = []
        current_is_layer = False
        for node in self.nodes:
            if node.op == "placeholder":
                continue
            src = self.producer_of(node)
            if src is not None and src in unit_of:
                unit_of[node] = unit_of[src]
                continue
            name = unit_name(node)
            if name is not None:
                if not plans or plans[-1].name != name:
                    if any(p.name == name for p in plans):
                        raise ModelError(f"unit {name!r} is not contiguous in the traced graph (another unit runs inside it); "
                                         "name the units yourself with --units")
                    plans.append(UnitPlan(name, kinds.get(name, "named")))
                current_is_layer = False
            elif self.is_layer(node):
                plans.append(UnitPlan(str(node.target), "layer"))
                current_is_layer = True
            elif not (current_is_layer and plans):
                pending.append(node)
                continue
            for p in pending:
                unit_of[p] = len(plans) - 1
            pending.clear()
            unit_of[node] = len(plans) - 1
            if self.is_layer(node):
                plans[-1].layers.append(str(node.target))
        for p in pending:
            unit_of[p] = max(len(plans) - 1, 0)
        return unit_of, plans


def warn_fallback(model_name: str) -> None:
    """No block was found, so block methods run layer by layer: say so, and what to do (a job prepares once)."""
    warn(f"{model_name}: no residual/concat block and no multi-layer module found in the traced graph; "
         "reconstructing one unit per Conv/Linear layer. Name blocks yourself with --units a,b,c (API: units=[...])")
