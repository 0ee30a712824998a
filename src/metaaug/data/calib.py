"""Calibration-set sampling: stratified by class and reproducible by seed."""

from __future__ import annotations

import torch

from metaaug.data.datasets import ImageDataset
from metaaug.errors import DataError


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Pick `n` indices with classes as balanced as possible; the same seed gives the same picks."""
    if n <= 0:
        raise DataError(f"calibration size must be positive, got {n}")
    if n > labels.numel():
        raise DataError(f"calibration size {n} exceeds the {labels.numel()} available images")
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(idx.numel(), generator=gen)] for idx in per_class]
    quota = [n // len(classes)] * len(classes)
    for i in torch.randperm(len(classes), generator=gen)[: n % len(classes)].tolist():
        quota[i] += 1
    picked, spare = [], []
    for idx, q in zip(per_class, quota, strict=True):
        picked.append(idx[:q])
        spare.append(idx[q:])
    out = torch.cat(picked)
    if out.numel() < n:  # some class too small: top up from the rest
        rest = torch.cat(spare)
        out = torch.cat([out, rest[torch.randperm(rest.numel(), generator=gen)[: n - out.numel()]]])
    return out[torch.randperm(out.numel(), generator=gen)]


def calibration_split(train: ImageDataset, n: int, seed: int, holdout: float = 0.0) -> tuple[ImageDataset, ImageDataset | None]:
    """Sample `n` calibration images; optionally hold out a fraction (stratified) for validation."""
    idx = stratified_indices(train.labels, n, seed)
    calib = train.subset(idx)
    if holdout <= 0:
        return calib, None
    if not 0 < holdout < 1:
        raise DataError(f"holdout fraction must be in (0, 1), got {holdout}")
    n_hold = round(n * holdout)
    if n_hold < 1 or n - n_hold < 1:
        raise DataError(f"holdout {holdout} of {n} images leaves an empty split")
    hold_local = stratified_indices(calib.labels, n_hold, seed + 7919)
    mask = torch.ones(n, dtype=torch.bool)
    mask[hold_local] = False
    return calib.subset(torch.nonzero(mask).flatten()), calib.subset(hold_local)


def only_classes(ds: ImageDataset, classes: tuple[int, ...] | None) -> ImageDataset:
    """The images of `classes` only (labels unchanged), e.g. the seen classes of a few-shot split."""
    if classes is None:
        return ds
    n = int(ds.labels.max()) + 1
    bad = [c for c in classes if not 0 <= c < n]
    if bad:
        raise DataError(f"class {bad[0]} does not exist; the data has classes 0..{n - 1}")
    return ds.subset(torch.nonzero(torch.isin(ds.labels, torch.tensor(classes))).flatten())
