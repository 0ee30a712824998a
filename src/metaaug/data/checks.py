"""Checks on data before it reaches a quantizer: finite, non-empty, labels the model can score."""

from __future__ import annotations

import torch

from metaaug.errors import DataError


def check_finite(images: torch.Tensor, what: str) -> None:
    """Reject empty or non-finite image tensors before they reach a quantizer."""
    if images.numel() == 0:
        raise DataError(f"{what}: no images")
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise DataError(f"{what}: {bad} image(s) contain NaN or Inf values")


def check_calibration(images: torch.Tensor) -> None:
    """Any non-empty finite set works: batches are drawn with replacement, so a set smaller than a batch (10 images,
    one per class) is reconstructed on as it is."""
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise DataError("calibration images must be a tensor of shape (N, C, H, W)")
    check_finite(images, "calibration data")
