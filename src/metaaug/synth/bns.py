"""BatchNorm statistics (BNS) of a frozen FP model, and FDDA's three BNS-alignment losses.

The losses compare the channel mean/variance of each BN layer's *input* on generated images with a target:
the layer's running statistics (global loss) or a class's statistics measured on a few real images (the class
"BNS centre"; centralised loss), optionally jittered with Gaussian noise (distorted loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from metaaug.errors import DataError, ModelError

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BN layers with running statistics, in forward-definition order; a clear error when there are none."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BN_TYPES)]
    if not layers:
        raise ModelError(f"{type(model).__name__} has no BatchNorm layers: FDDA needs the FP model's BN statistics "
                         "(pass the model before BN folding)")
    no_stats = [name for name, m in layers if m.running_mean is None or m.running_var is None]
    if no_stats:
        raise ModelError(f"BatchNorm layer {no_stats[0]!r} keeps no running statistics (track_running_stats=False)")
    return layers


@dataclass
class Moments:
    """Per-sample channel mean and variance `(N, C)` of one BN layer's input (kept in the autograd graph)."""

    mean: torch.Tensor
    var: torch.Tensor


class BNStats:
    """Context manager that records every BN layer's input moments on each forward pass of `model`."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = bn_layers(model)
        self.moments: list[Moments | None] = [None] * len(self.layers)
        self._handles: list = []

    def _hook(self, index: int):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            x = x.reshape(x.shape[0], x.shape[1], -1).float()
            self.moments[index] = Moments(x.mean(2), x.var(2, unbiased=False))
        return record

    def __enter__(self) -> BNStats:
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def collected(self) -> list[Moments]:
        if any(m is None for m in self.moments):
            missing = next(name for (name, _), m in zip(self.layers, self.moments, strict=True) if m is None)
            raise ModelError(f"BatchNorm layer {missing!r} was not reached by the forward pass")
        return list(self.moments)  # type: ignore[arg-type]


def batch_stats(m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean/variance per channel from per-sample moments (law of total variance)."""
    mean = m.mean.mean(0)
    return mean, m.var.mean(0) + (m.mean - mean).pow(2).mean(0)


def class_stats(m: Moments, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class mean/variance `(K, C)` over the samples of each class, and the class counts `(K,)`."""
    onehot = nn.functional.one_hot(labels, num_classes).to(m.mean.dtype)
    counts = onehot.sum(0)
    denom = counts.clamp_min(1).unsqueeze(1)
    mean = onehot.T @ m.mean / denom
    var = (onehot.T @ m.var + onehot.T @ (m.mean - mean[labels]).pow(2)) / denom
    return mean, var, counts


def stat_distance(mean: torch.Tensor, var: torch.Tensor, t_mean: torch.Tensor, t_var: torch.Tensor) -> torch.Tensor:
    """L2 distance of means plus L2 distance of variances over the channel (last) dim."""
    return torch.linalg.vector_norm(mean - t_mean, dim=-1) + torch.linalg.vector_norm(var - t_var, dim=-1)


def global_bns_loss(moments: list[Moments], layers: list[tuple[str, nn.Module]]) -> torch.Tensor:
    """Batch statistics vs each BN layer's running statistics, averaged over all layers."""
    terms = [stat_distance(*batch_stats(m), bn.running_mean.float(), bn.running_var.float())
             for m, (_, bn) in zip(moments, layers, strict=True)]
    return torch.stack(terms).mean()


@dataclass
class ClassCentres:
    """Each class's BNS centre at the layers in `layer_ids`: mean and variance `(K, C)` per layer."""

    layer_ids: list[int]
    mean: list[torch.Tensor]
    var: list[torch.Tensor]

    def to(self, device: torch.device | str) -> ClassCentres:
        return ClassCentres(self.layer_ids, [t.to(device) for t in self.mean], [t.to(device) for t in self.var])


def deep_half(n_layers: int, fraction: float = 0.5) -> list[int]:
    """Indices of the deepest `fraction` of the BN layers (at least one)."""
    return list(range(n_layers - max(1, math.ceil(n_layers * fraction)), n_layers))


@torch.no_grad()
def class_centres(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  layer_ids: list[int], batch: int = 256) -> ClassCentres:
    """Measure every class's BNS centre on real images (all on the model's device); each class needs one image."""
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise DataError(f"no real image of class {missing[0]} to measure its BN-statistics centre")
    dev = next(model.parameters()).device
    per_layer: list[list[Moments]] = [[] for _ in layer_ids]
    with BNStats(model) as rec:
        for i in range(0, len(images), batch):
            model(images[i:i + batch].to(dev))
            got = rec.collected()
            for j, lid in enumerate(layer_ids):
                per_layer[j].append(got[lid])
    means, vars_ = [], []
    for chunks in per_layer:
        m = Moments(torch.cat([c.mean for c in chunks]), torch.cat([c.var for c in chunks]))
        mean, var, _ = class_stats(m, labels.to(dev), num_classes)
        means.append(mean)
        vars_.append(var)
    return ClassCentres(layer_ids, means, vars_)


def class_bns_loss(moments: list[Moments], labels: torch.Tensor, centres: ClassCentres,
                   noise_std: tuple[float, float] = (0.0, 0.0), generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-class batch statistics vs the class centres (plus Gaussian noise of std `noise_std` = (mean, var)).

    With zero noise this is FDDA's BNS-centralised loss; with the paper's (0.5, 1.0) it is the BNS-distorted loss,
    which spreads the generated images around the centre instead of collapsing onto it. Averaged over the
    classes present in the batch and over the centre layers.
    """
    num_classes = centres.mean[0].shape[0]
    terms = []
    for lid, t_mean, t_var in zip(centres.layer_ids, centres.mean, centres.var, strict=True):
        mean, var, counts = class_stats(moments[lid], labels, num_classes)
        if noise_std[0] > 0:
            t_mean = t_mean + noise_std[0] * torch.randn(t_mean.shape, generator=generator).to(t_mean.device)
        if noise_std[1] > 0:
            t_var = t_var + noise_std[1] * torch.randn(t_var.shape, generator=generator).to(t_var.device)
        present = counts > 0
        terms.append(stat_distance(mean, var, t_mean, t_var)[present].mean())
    return torch.stack(terms).mean()
