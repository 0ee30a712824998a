"""MetaAug's transformation network T: a small residual UNet, exactly the identity at initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(min(8, cout), cout), nn.LeakyReLU(0.1))


class TransformNet(nn.Module):
    """`T(x) = x + r(x)`; `r` is a two-level UNet whose last conv starts at zero, so T starts as the identity.

    The paper's T is a large UNet started from an unpublished warm-up checkpoint; the residual form needs none.
    Works for any input size (skips are resized on the way up) and channel count.
    With `units` > 0, T is conditioned on the block it renders images for: each unit has its own scale and shift of
    the bottleneck features (FiLM), zero at the start, so every block begins from the shared T and adapts it.
    """

    def __init__(self, channels: int = 1, width: int = 16, units: int = 0) -> None:
        super().__init__()
        w = width
        self.film = nn.Parameter(torch.zeros(units, 2, 4 * w)) if units else None
        self.enc1 = nn.Sequential(_conv(channels, w), _conv(w, w))
        self.enc2 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.mid = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))
        self.dec2 = _conv(4 * w + 2 * w, 2 * w)
        self.dec1 = _conv(2 * w + w, w)
        self.out = nn.Conv2d(w, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def residual(self, x: torch.Tensor, unit: int | None = None) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        m = self.mid(e2)
        if self.film is not None:
            if unit is None:
                raise ValueError("this T is conditioned on the block: give the unit index")
            scale, shift = self.film[unit, :, :, None, None]
            m = m * (1 + scale) + shift
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        return self.out(d1)

    def forward(self, x: torch.Tensor, unit: int | None = None) -> torch.Tensor:
        return x + self.residual(x, unit)
