"""In-memory image datasets: every supported source becomes normalised float tensors plus labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metaaug.data.idx import find_idx, read_idx
from metaaug.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageDataset:
    """Normalised images `(N, C, H, W)` float32 and integer labels `(N,)`, with the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, idx: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[idx], self.labels[idx], self.classes)


def _normalise(images_u8: np.ndarray, mean: float, std: float) -> torch.Tensor:
    return (torch.from_numpy(images_u8.astype(np.float32) / 255.0) - mean) / std


def load_idx_folder(folder: Path, split: str) -> ImageDataset:
    """Fashion-MNIST style IDX pair: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not pair up")
    x = _normalise(images, FASHION_MNIST_MEAN, FASHION_MNIST_STD).unsqueeze(1)
    classes = [str(i) for i in range(int(labels.max()) + 1)]
    return ImageDataset(x, torch.from_numpy(labels.astype(np.int64)), classes)


def load_image_folder(folder: Path, size: int = 28, channels: int = 1) -> ImageDataset:
    """ImageNet-style folder: one sub-folder per class, images inside; resized to `size` and normalised.

    Uses the Fashion-MNIST statistics so a folder of 28x28 grey images feeds the bundled models directly.
    """
    from PIL import Image

    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{folder} has no class sub-folders (expected <folder>/<class>/<image>)")
    mode = "L" if channels == 1 else "RGB"
    arrays, labels = [], []
    for label, cdir in enumerate(class_dirs):
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert(mode).resize((size, size)), dtype=np.uint8)
            except OSError as exc:
                raise DataError(f"cannot read image {f}: {exc}") from None
            arrays.append(arr if channels == 3 else arr[..., None])
            labels.append(label)
    if not arrays:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    x = _normalise(np.stack(arrays), FASHION_MNIST_MEAN, FASHION_MNIST_STD).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(x, torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs])


def load_dataset(data_dir: str | Path | None, split: str) -> ImageDataset:
    """Load `split` ('train' or 'test') from IDX files or an image folder (`<dir>/<split>/<class>/...`)."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    if not folder.is_dir():
        hint = " (install it: apt-get install -y dataset-fashion-mnist)" if data_dir is None else ""
        raise DataError(f"data folder {folder} does not exist{hint}")
    if any(folder.glob("*-ubyte*")):
        ds = load_idx_folder(folder, split)
    elif (folder / split).is_dir():
        ds = load_image_folder(folder / split)
    elif split == "test" and (folder / "val").is_dir():
        ds = load_image_folder(folder / "val")
    else:
        raise DataError(f"{folder} holds neither IDX files nor a '{split}/' image folder")
    check_finite(ds.images, f"{split} images from {folder}")
    return ds


def check_finite(images: torch.Tensor, what: str) -> None:
    """Reject empty or non-finite image tensors before they reach a quantizer."""
    if images.numel() == 0:
        raise DataError(f"{what}: no images")
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise DataError(f"{what}: {bad} image(s) contain NaN or Inf values")
