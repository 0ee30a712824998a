"""Label-preserving image augmentation shared by FP training, QAT and MetaAug's validation views."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, pad: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random shift by up to `pad` pixels (zero-padded crop) and horizontal flip, per image (seeded by `generator`,
    else by the global RNG). The draws are made on the CPU, so a seed gives the same views on every device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None]).clamp_max(h + 2 * pad - 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    out[flip] = out[flip].flip(-1)
    return out.contiguous()
