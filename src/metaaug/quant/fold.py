"""Fold BatchNorm into the preceding conv/linear in an FX graph (inference-equivalent)."""

from __future__ import annotations

import torch
from torch import fx, nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def fold_into(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """`bn(layer(x)) == layer'(x)`: scale the weight per output channel and absorb the shift in the bias."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    layer.weight.mul_(factor.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    layer.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every BN fed only by a Conv2d/Linear; returns the number folded. Other BNs stay as they are."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BN):
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer = modules[prev.target]
        if not isinstance(layer, nn.Conv2d | nn.Linear) or layer.weight.shape[0] != modules[node.target].num_features:
            continue
        fold_into(layer, modules[node.target])
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded
