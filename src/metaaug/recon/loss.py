"""Reconstruction losses: output error and AdaRound's annealed rounding regulariser."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaaug.quant.quantizers import WeightQuantizer


def as_tuple(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The tensors of a unit's output (shapes that a unit hands to the next are not compared)."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(v for v in x if isinstance(v, torch.Tensor))


def output_error(pred, target) -> torch.Tensor:
    """BRECQ's block loss: squared error summed over channels, averaged over batch (and positions). Channels are dim 1
    of an NCHW map or a (batch, features) matrix, and the last dim of a (batch, tokens, channels) sequence."""
    return sum(((p - t) ** 2).sum(-1 if p.dim() == 3 else 1).mean() for p, t in zip(as_tuple(pred), as_tuple(target), strict=True))


def beta_at(it: int, total: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """Annealed exponent for the rounding regulariser; None during warm-up (regulariser off)."""
    warm = int(warmup * total)
    if it < warm:
        return None
    t = (it - warm) / max(1, total - warm)
    return end + (start - end) * max(0.0, 1.0 - t)


def rounding_penalty(quantizers: Sequence[WeightQuantizer], beta: float | None, weight: float) -> torch.Tensor | float:
    if beta is None or weight == 0 or not quantizers:
        return 0.0
    return weight * sum(q.round_penalty(beta) for q in quantizers)
