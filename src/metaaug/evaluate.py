"""Top-1 accuracy and logits over a dataset, batched, on any device."""

from __future__ import annotations

import torch
from torch import nn

from metaaug.data.datasets import ImageDataset
from metaaug.quant.capture import output_logits
from metaaug.recon.cache import slice_rows


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch: int = 500, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's logits for `images` (a dict, ModelOutput or tuple output gives its logits: `output_logits`).
    Batches hold at most `batch` images and `recon.cache.SLICE_BYTES` of input: 500 at 28x28, ~110 at 224x224 RGB,
    so a large model's activations stay small."""
    batch = slice_rows(images.shape[1:], batch)
    outs = [output_logits(model(images[i : i + batch].to(device))).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of precomputed logits."""
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def top1(model: nn.Module, ds: ImageDataset, batch: int = 500, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in percent."""
    return accuracy(logits_of(model, ds.images, batch, device), ds.labels)
