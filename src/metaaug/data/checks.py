"""Checks on data before it reaches a quantizer: finite, non-empty, labels the model can score."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from metaaug.errors import DataError, ModelError, warn
from metaaug.quant.capture import output_logits

if TYPE_CHECKING:
    from metaaug.data.datasets import ImageDataset


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


def model_outputs(model: nn.Module, example: torch.Tensor) -> int:
    """The number of class scores `model` gives, from one forward of one image (`(C, H, W)`, or the first of a batch)
    under no_grad in eval mode: a model that fails on the data or returns anything but `(1, K)` is refused here, in
    one line, not deep inside a quantizer."""
    x = example.unsqueeze(0) if example.dim() == 3 else example[:1]
    param = next(iter(model.parameters()), None)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = output_logits(model(x.to(param.device) if param is not None else x))
    except ModelError:
        raise
    except Exception as exc:  # a user model: a channel or size mismatch, anything its forward raises
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"the model fails on one {tuple(x.shape[1:])} image of the data: {type(exc).__name__}: {msg}") from None
    finally:
        for m, training in modes.items():
            m.training = training
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returns a {type(out).__name__} for one image; expected a tensor of class scores (1, K)")
    if out.dim() != 2 or out.shape[0] != 1 or out.shape[1] == 0:
        raise ModelError(f"the model's output for one image has shape {tuple(out.shape)}; expected class scores of shape (1, K)")
    return int(out.shape[1])


def _unused_outputs(num_outputs: int, classes: int, what: str) -> str:
    return (f"the model has {num_outputs} outputs but {what} has {classes} classes; top-1 counts only outputs 0..{classes - 1} "
            f"as right, a prediction of outputs {classes}..{num_outputs - 1} is always wrong")


def _named(classes: list[str]) -> bool:
    """Classes with names of their own (image folders), not just the indices 0..N-1."""
    return classes != [str(i) for i in range(len(classes))]


def _check_label_range(labels: torch.Tensor, num_outputs: int, what: str) -> None:
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise DataError(f"{what}: label {lo} is negative (labels are class indices 0..N-1)")
        if hi >= num_outputs:
            raise DataError(f"{what}: labels go up to {hi} but the model has {num_outputs} outputs")


def check_labels(dataset: ImageDataset, num_outputs: int, what: str, *, warn_unused: bool = True) -> None:
    """Labels index the model's outputs: a label outside 0..K-1, or more classes than outputs, would silently count
    as wrong (or crash a loss), so they are refused; more outputs than classes (a 1000-class head on 10-class data)
    is only warned about. Classes count from `dataset.classes`, not the labels present, so data restricted to some
    classes (`only_classes`) does not warn."""
    classes = len(dataset.classes)
    too_many = DataError(f"{classes} classes in {what} but the model has {num_outputs} outputs")
    if classes > num_outputs and _named(dataset.classes):  # counted from the labels (IDX), a stray label is the news
        raise too_many
    _check_label_range(dataset.labels, num_outputs, what)
    if classes > num_outputs:
        raise too_many
    if warn_unused and num_outputs > classes:
        warn(_unused_outputs(num_outputs, classes, what))


def check_model_fits_data(model: nn.Module, data_dir: str | Path | None, **splits: ImageDataset) -> None:
    """Before a job starts: the model scores one image of the data, and every split's labels fit its outputs
    (`check_labels`; the warning about unused outputs once, for the whole data)."""
    from metaaug.data.datasets import FASHION_MNIST_DIR

    where = str(data_dir if data_dir is not None else FASHION_MNIST_DIR)
    num_outputs = model_outputs(model, next(iter(splits.values())).images[:1])
    for split, ds in splits.items():  # labels of every split first where classes are counted from them (IDX)
        if not _named(ds.classes):
            _check_label_range(ds.labels, num_outputs, f"{where} ({split})")
    for split, ds in splits.items():
        check_labels(ds, num_outputs, f"{where} ({split})", warn_unused=False)
    classes = max(len(ds.classes) for ds in splits.values())
    if num_outputs > classes:
        warn(_unused_outputs(num_outputs, classes, f"the data in {where}"))
