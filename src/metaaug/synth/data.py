"""Reading a synthetic-image folder and assembling the calibration set from real, synthetic or both sources."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from metaaug.data.calib import calibration_split, stratified_indices
from metaaug.data.checks import check_finite
from metaaug.data.datasets import ImageDataset
from metaaug.errors import ConfigError, DataError

IMAGES_FILE = "images.safetensors"
CALIB_SOURCES = ("real", "synthetic", "mixed")


def check_calib_source(source: str, synth: str | Path | None, mixed_synth: int | None = None) -> None:
    """Reject a calibration source/synth-folder combination that cannot work, before any data is loaded."""
    if source not in CALIB_SOURCES:
        raise ConfigError(f"unknown calibration source {source!r}; use one of {', '.join(CALIB_SOURCES)}")
    if mixed_synth is not None:
        if source != "mixed":
            raise ConfigError("--mixed-synth is only used with --calib-source mixed")
        if mixed_synth <= 0:
            raise ConfigError(f"--mixed-synth must be a positive number of synthetic images, got {mixed_synth}")
    if source == "real":
        if synth is not None:
            raise ConfigError("--synth is only used with --calib-source synthetic or mixed")
        return
    if synth is None:
        raise ConfigError(f"--calib-source {source} needs --synth <folder written by `metaaug synth`>")
    check_synth_folder(synth)


def check_synth_folder(synth: str | Path) -> None:
    """Reject a path that is not a folder written by `metaaug synth`, before any data is loaded."""
    folder = Path(synth)
    if not folder.is_dir():
        raise ConfigError(f"synth folder {folder} does not exist (write one with `metaaug synth --out {folder}`)")
    if not (folder / IMAGES_FILE).is_file():
        if (folder / "config.json").is_file():
            from metaaug.runs.folder import RunFolder

            kind = RunFolder.open(folder, ("quantize", "qat", "search", "synth"), "--synth").kind
            what = "an unfinished synth run" if kind == "synth" else f"a {kind} run folder, not a synth folder"
            raise ConfigError(f"{folder} is {what} (no {IMAGES_FILE}); give a folder `metaaug synth --out` finished")
        raise ConfigError(f"synth folder {folder} holds no {IMAGES_FILE} (write one with `metaaug synth --out {folder}`)")


def load_synthetic(folder: str | Path) -> ImageDataset:
    """The images and generator labels saved by `metaaug synth` as a dataset."""
    path = Path(folder) / IMAGES_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (write it with `metaaug synth --out {folder}`)")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or labels is None:
        raise DataError(f"{path} must hold the tensors 'images' and 'labels'")
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
        raise DataError(f"{path}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not pair up")
    check_finite(images, f"synthetic images in {path}")
    classes = json.loads(meta["classes"]) if "classes" in meta else [str(i) for i in range(int(labels.max()) + 1)]
    return ImageDataset(images.float(), labels.long(), classes)


def _concat(a: ImageDataset, b: ImageDataset) -> ImageDataset:
    if a.images.shape[1:] != b.images.shape[1:]:
        raise DataError(f"synthetic images {tuple(b.images.shape[1:])} do not match the real images {tuple(a.images.shape[1:])}")
    return ImageDataset(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes)


def calibration_set(train: ImageDataset, source: str, synth: str | Path | None, n: int | None, seed: int,
                    holdout: float = 0.0, mixed_synth: int | None = None) -> tuple[ImageDataset, ImageDataset | None]:
    """Calibration (and optional holdout) images for a run.

    `real`: `n` stratified training images (as before). `synthetic`: `n` images stratified from the synthetic
    set (all of them when `n` is None). `mixed`: `n` real images plus `mixed_synth` stratified synthetic images (default: all of them; fewer keeps
    the real images from being outnumbered). The holdout is taken from whatever set results.
    """
    check_calib_source(source, synth, mixed_synth)
    if n is None and source != "synthetic":
        raise ConfigError(f"--calib-source {source} needs a calibration size")
    if source == "real":
        return calibration_split(train, n, seed, holdout)
    syn = load_synthetic(synth)  # type: ignore[arg-type]
    if int(syn.labels.max()) >= len(train.classes):
        raise DataError(f"synthetic labels go up to {int(syn.labels.max())} but the data has {len(train.classes)} classes")
    if source == "synthetic":
        return calibration_split(syn, len(syn) if n is None else n, seed, holdout)
    real = train.subset(stratified_indices(train.labels, n, seed))
    if mixed_synth is not None:
        if mixed_synth > len(syn):
            raise DataError(f"--mixed-synth {mixed_synth} exceeds the {len(syn)} images in {synth}")
        syn = syn.subset(stratified_indices(syn.labels, mixed_synth, seed))
    both = _concat(real, ImageDataset(syn.images, syn.labels, train.classes))
    return calibration_split(both, len(both), seed, holdout)
