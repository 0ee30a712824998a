"""Step-size initialisation: the step (and zero point) minimising the Lp quantization error over clip ratios.

Every quantizer starts here (post-training quantizers, each width of the QAT banks, MetaQuantNet's step tables,
the sensitivity baseline), on the grid it quantizes onto (`metaaug.quant.grids`).
"""

from __future__ import annotations

import torch

from metaaug.errors import ConfigError
from metaaug.quant.grids import act_bounds, log2_levels

# Lp norm of the clip-ratio searches (QDrop's setting uses 2.4 for both). Measured on the bundled ResNet-20 with
# round-to-nearest: activations at p=2.0 gave W2A4 44.8 / W2A2 45.7, at p=2.4 67.2 / 54.0 (p=3.0: 62.2 / 50.8).
WEIGHT_P, ACT_P = 2.4, 2.4


def lp_search_channel(w: torch.Tensor, bits: int, p: float = WEIGHT_P, grid: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric scale/zero-point minimising the Lp error over clip ratios 1.00 -> 0.01."""
    w2 = w.flatten(1)
    levels = 2**bits - 1
    wmin, wmax = w2.min(1).values.clamp(max=0), w2.max(1).values.clamp(min=0)
    best_err = torch.full_like(wmin, float("inf"))
    best_s, best_z = torch.ones_like(wmin), torch.zeros_like(wmin)
    for r in torch.linspace(1.0, 0.01, grid).tolist():
        lo, hi = wmin * r, wmax * r
        s = ((hi - lo) / levels).clamp(min=1e-8)
        z = (-lo / s).round()
        q = ((w2 / s[:, None]).round() + z[:, None]).clamp(0, levels)
        err = ((q - z[:, None]) * s[:, None] - w2).abs().pow(p).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def weight_qparams(w: torch.Tensor, bits: int, p: float = WEIGHT_P) -> tuple[torch.Tensor, torch.Tensor]:
    """`lp_search_channel` shaped `(C, 1, ...)` to broadcast against `w`."""
    s, z = lp_search_channel(w.detach(), bits, p)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    return s.reshape(shape), z.reshape(shape)


def lp_search_tensor(x: torch.Tensor, lo: int, hi: int, p: float = ACT_P, grid: int = 100) -> torch.Tensor:
    """Per-tensor step size for the integer range [lo, hi] minimising the Lp error over clip ratios."""
    x = x.flatten().float()
    bound = x.abs().max().clamp(min=1e-8) if lo < 0 else x.max().clamp(min=1e-8)
    best_err, best_s = float("inf"), bound / hi
    for r in torch.linspace(1.0, 0.01, grid).tolist():
        s = bound * r / hi
        err = float(((x / s).round().clamp(lo, hi) * s - x).abs().pow(p).mean())
        if err < best_err:
            best_err, best_s = err, s
    return best_s.reshape(1)


def lp_search_log2(x: torch.Tensor, bits: int, p: float = ACT_P, grid: int = 100) -> torch.Tensor:
    """Per-tensor top level `s` of the log2 grid minimising the Lp error. Candidates: the maximum times clip ratios
    1.00 -> 0.01, spaced geometrically as the grid is, and `s = 1` (the natural top of a softmax output)."""
    x = x.flatten().float()
    bound = x.max().clamp(min=1e-8)
    candidates = [bound * r for r in torch.logspace(0, -2, grid).tolist()] + [torch.ones_like(bound)]
    best_err, best_s = float("inf"), bound
    for s in candidates:
        err = float((log2_levels(x / s, 0, 2**bits - 1)[0] * s - x).abs().pow(p).mean())
        if err < best_err:
            best_err, best_s = err, s
    return best_s.reshape(1)


def act_step(x: torch.Tensor, bits: int, signed: bool, grid: str, p: float = ACT_P) -> torch.Tensor:
    """The Lp-searched per-tensor step of `x` on `grid` at `bits`, shape (1,)."""
    if grid == "log2":
        if signed:
            raise ConfigError("the log2 activation grid quantizes non-negative tensors (softmax outputs); this one has negative values")
        return lp_search_log2(x, bits, p)
    lo, hi = act_bounds(bits, signed)
    return lp_search_tensor(x, lo, hi, p)
