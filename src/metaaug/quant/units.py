"""Reconstruction units: which graph nodes belong to which block (or lone layer)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import fx, nn

from metaaug.errors import ConfigError

# Block classes recognised by name, so torchvision's are found without importing torchvision.
KNOWN_BLOCKS = frozenset({"BasicBlock", "Bottleneck", "InvertedResidual"})


def detect_blocks(model: nn.Module) -> list[str]:
    """Module paths of the outermost known residual blocks, in definition order."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in KNOWN_BLOCKS and not any(name.startswith(p + ".") for p in found):
            found.append(name)
    return found


def check_unit_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    paths = dict(model.named_modules())
    names = list(names)
    unknown = [n for n in names if n not in paths]
    if unknown:
        raise ConfigError(f"unit {unknown[0]!r} is not a submodule of the model")
    return names


def _block_of(node: fx.Node, blocks: set[str]) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    for key in stack:  # outermost first
        path = stack[key][0] if isinstance(stack[key], tuple) else key
        if path in blocks:
            return path
    return None


def assign_units(graph: fx.Graph, blocks: list[str], is_layer, producer_of) -> tuple[dict[fx.Node, int], list[str]]:
    """Give each compute node a unit index, in topological order.

    Nodes inside a block form that block's unit; every quantized layer outside a block is a unit of its own,
    followed by the parameter-free nodes after it (activation, pooling). Glue after a block (pool, flatten)
    joins the next unit. A quantizer node joins the unit of the tensor it quantizes.
    """
    block_set = set(blocks)
    unit_of: dict[fx.Node, int] = {}
    names: list[str] = []
    pending: list[fx.Node] = []
    current_is_layer = False
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        src = producer_of(node)
        if src is not None and src in unit_of:
            unit_of[node] = unit_of[src]
            continue
        block = _block_of(node, block_set)
        if block is not None:
            if not names or names[-1] != block:
                names.append(block)
            current_is_layer = False
        elif is_layer(node):
            names.append(str(node.target))
            current_is_layer = True
        elif current_is_layer or not names:
            if not names:
                pending.append(node)
                continue
        else:
            pending.append(node)
            continue
        for p in pending:
            unit_of[p] = len(names) - 1
        pending.clear()
        unit_of[node] = len(names) - 1
    for p in pending:
        unit_of[p] = max(len(names) - 1, 0)
    return unit_of, names


def warn_fallback(model: nn.Module) -> None:
    warnings.warn(
        f"{type(model).__name__}: no known block type ({', '.join(sorted(KNOWN_BLOCKS))}) found and no units named; "
        "falling back to one reconstruction unit per Conv/Linear layer",
        stacklevel=3,
    )
