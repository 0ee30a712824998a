"""In-memory image datasets: every supported source becomes normalised float tensors plus labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metaaug.data.checks import check_finite
from metaaug.data.idx import find_idx, read_idx
from metaaug.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


GREY_MODES = {"1", "L", "LA", "I", "I;16", "F", "P"}


@dataclass(frozen=True)
class DataInfo:
    """What travels with the data: channels, image size, the per-channel normalisation (of [0, 1] pixels), and
    from it the range normalised pixels span (synthetic images are generated inside it)."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def value_range(self) -> tuple[float, float]:
        return (min(-m / s for m, s in zip(self.mean, self.std, strict=True)),
                max((1 - m) / s for m, s in zip(self.mean, self.std, strict=True)))


FASHION_MNIST_INFO = DataInfo(1, (28, 28), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))


@dataclass
class ImageDataset:
    """Normalised images `(N, C, H, W)` float32 and integer labels `(N,)`, with the class names and the descriptor
    of how they were made (None for tensors from elsewhere, e.g. synthetic images)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    info: DataInfo | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, idx: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.info)


def _normalise(images_u8: np.ndarray, info: DataInfo) -> torch.Tensor:
    """uint8 `(N, H, W, C)` -> normalised float `(N, C, H, W)`."""
    x = torch.from_numpy(images_u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    # per channel with Python scalars: the exact arithmetic the bundled models' numbers were measured with
    return torch.stack([(x[:, c] - m) / sd for c, (m, sd) in enumerate(zip(info.mean, info.std, strict=True))], 1)


def load_idx_folder(folder: Path, split: str) -> ImageDataset:
    """Fashion-MNIST style IDX pair: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not pair up")
    info = DataInfo(1, (int(images.shape[1]), int(images.shape[2])), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))
    x = _normalise(images[..., None], info)
    classes = [str(i) for i in range(int(labels.max()) + 1)]
    return ImageDataset(x, torch.from_numpy(labels.astype(np.int64)), classes, info)


def _image_files(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{folder} has no class sub-folders (expected <folder>/<class>/<image>)")
    files, labels = [], []
    for label, cdir in enumerate(class_dirs):
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, [d.name for d in class_dirs]


def _probe(files: list[Path]) -> tuple[int, tuple[int, int]]:
    """Channels (1 if every image is grey, else 3) and the most common size (H, W), from the image headers."""
    from PIL import Image

    modes, sizes = set(), {}
    for f in files:
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
                sizes[(im.height, im.width)] = sizes.get((im.height, im.width), 0) + 1
        except OSError as exc:
            raise DataError(f"cannot read image {f}: {exc}") from None
    return (1 if modes <= GREY_MODES else 3), max(sizes, key=sizes.get)


STATS_IMAGES = 2000


def _read(f: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 `(H, W, C)`, converted to `channels` and resized to `size` where it differs."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if (im.height, im.width) != size:
                im = im.resize((size[1], size[0]))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {f}: {exc}") from None
    return arr[..., None] if channels == 1 else arr


def folder_info(folder: Path) -> DataInfo:
    """The descriptor of an image folder (its train split): channels, size, per-channel mean/std of at most
    STATS_IMAGES evenly spaced images."""
    files, _, _ = _image_files(folder)
    channels, size = _probe(files)
    picked = files[:: max(1, len(files) // STATS_IMAGES)]
    px = torch.from_numpy(np.stack([_read(f, channels, size) for f in picked]).astype(np.float32) / 255.0).reshape(-1, channels)
    return DataInfo(channels, size, tuple(round(float(v), 4) for v in px.mean(0)),
                    tuple(round(float(v), 4) for v in px.std(0).clamp(min=1e-3)))


def load_image_folder(folder: Path, info: DataInfo | None = None) -> ImageDataset:
    """ImageNet-style folder: one sub-folder per class, images inside, at any size and channel count.

    Without `info` (a train split) the channels and size come from the images (grey if all are grey, else RGB; the
    most common size, others resized to it) and the normalisation from their per-channel mean and std
    (`folder_info`); a test split is loaded with its train split's `info`, so both are normalised alike.
    """
    files, labels, classes = _image_files(folder)
    info = info or folder_info(folder)
    stack = np.stack([_read(f, info.channels, info.size) for f in files])
    return ImageDataset(_normalise(stack, info), torch.tensor(labels, dtype=torch.int64), classes, info)


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
    elif (folder / split).is_dir() or (split == "test" and (folder / "val").is_dir()):
        info = folder_info(folder / "train") if (folder / "train").is_dir() else None  # test uses the train statistics
        ds = load_image_folder(folder / split if (folder / split).is_dir() else folder / "val", info)
    else:
        raise DataError(f"{folder} holds neither IDX files nor a '{split}/' image folder")
    check_finite(ds.images, f"{split} images from {folder}")
    return ds
