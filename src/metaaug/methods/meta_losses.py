"""MetaAug's outer-loss terms: validation KL, the margin that forces T to move x, and PKT on FP features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    t = F.softmax(teacher_logits / temperature, 1)
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), t, reduction="batchmean")


def margin(tx: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """`relu(eps - mean((T(x) - x)^2))`: zero once T moves the images by more than eps (mean squared)."""
    return F.relu(eps - ((tx - x) ** 2).mean())


def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): match the batches' cosine-similarity distributions."""
    s = F.normalize(student.flatten(1), dim=1, eps=eps)
    t = F.normalize(teacher.flatten(1), dim=1, eps=eps)
    ps, pt = (s @ s.T + 1) / 2, (t @ t.T + 1) / 2
    ps, pt = ps / ps.sum(1, keepdim=True), pt / pt.sum(1, keepdim=True)
    return (pt * torch.log((pt + eps) / (ps + eps))).sum(1).mean()


def mixup_pair(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix two aligned batches with the same coefficient and partner permutation."""
    lam = float(torch.rand((), generator=gen))
    perm = torch.randperm(a.shape[0], generator=gen).to(a.device)
    return lam * a + (1 - lam) * a[perm], lam * b + (1 - lam) * b[perm]
