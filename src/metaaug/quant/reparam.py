"""LayerNorm channel reparameterisation (the scale part of RepQ-ViT, Li et al. 2023): the per-channel spread of a
LayerNorm's output moves into the weights of the Linear layers that read it, so one per-tensor activation quantizer
fits every channel. `LN'(x) = LN(x) / r` (gamma and beta divided by r) and `W' = W * r` (per input column) compute
exactly the same function. r_c = range_c^alpha over calibration inputs (normalised to geometric mean 1): alpha = 1
equalises the activation channels fully (RepQ-ViT's scale reparameterisation) and moves their whole spread into the
weight columns; alpha = 0.5 splits it between the two (SmoothQuant's migration strength, Xiao et al. 2023). Off by
default: whether it pays is measured in bench/vit (on a random-init ViT with 30x outlier channels it did not)."""

from __future__ import annotations

import torch
from torch import fx, nn

from metaaug.quant.graph_ops import is_size

ALPHA = 0.5


@torch.no_grad()
def reparam_layernorms(gm: fx.GraphModule, example: torch.Tensor, alpha: float = ALPHA, max_images: int = 256) -> list[str]:
    """Reparameterise every affine `nn.LayerNorm` whose output only `nn.Linear` layers read (over its last dim);
    returns their module paths. `example`: calibration images (up to `max_images` are used)."""
    modules = dict(gm.named_modules())
    targets: dict[fx.Node, list[nn.Linear]] = {}
    for node in gm.graph.nodes:
        ln = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(ln, nn.LayerNorm) or not ln.elementwise_affine or len(ln.normalized_shape) != 1:
            continue
        readers = [modules.get(str(u.target)) if u.op == "call_module" else None for u in node.users if not is_size(u)]
        if readers and all(isinstance(r, nn.Linear) for r in readers):
            targets[node] = readers
    if not targets:
        return []
    ranges: dict[fx.Node, torch.Tensor] = {}
    hooks = [modules[str(n.target)].register_forward_hook(
        lambda _m, _i, out, n=n: ranges.__setitem__(n, torch.maximum(ranges.get(n, torch.zeros(())), out.detach().abs().flatten(0, -2).amax(0))))
        for n in targets]
    try:
        for i in range(0, min(len(example), max_images), 64):
            gm(example[i : min(i + 64, max_images)].to(next(gm.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    done = []
    for node, linears in targets.items():
        r = ranges[node].clamp(min=1e-6).pow(alpha)
        r = r / r.log().mean().exp()  # geometric mean 1: the overall scale stays where it was
        ln = modules[str(node.target)]
        ln.weight.div_(r)
        if ln.bias is not None:
            ln.bias.div_(r)
        for lin in {id(x): x for x in linears}.values():
            lin.weight.mul_(r)
        done.append(str(node.target))
    return done
