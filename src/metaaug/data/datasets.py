"""In-memory image datasets: every supported source becomes normalised float tensors plus labels."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metaaug.data.checks import check_finite
from metaaug.data.idx import find_idx, read_idx, read_idx_labels
from metaaug.errors import DataError, warn

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# grey whatever their file held; palette images (P, PA) are grey when every colour they use is
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "F"}
WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "F"}  # read at full precision, not through 8 bits


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


def _normalise(images: np.ndarray, info: DataInfo) -> torch.Tensor:
    """`(N, H, W, C)` pixels, uint8 or float32 already in [0, 1] -> normalised float `(N, C, H, W)`."""
    x = torch.from_numpy(_unit(images)).permute(0, 3, 1, 2)
    # per channel with Python scalars: the exact arithmetic the bundled models' numbers were measured with
    return torch.stack([(x[:, c] - m) / sd for c, (m, sd) in enumerate(zip(info.mean, info.std, strict=True))], 1)


def _unit(pixels: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] as float32: uint8 divided by 255 exactly as it always was (8-bit data stays bit-identical)."""
    return pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels.astype(np.float32, copy=False)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One array of images: uint8 when every image is 8-bit (a quarter of the memory), else float32 in [0, 1]."""
    if all(a.dtype == np.uint8 for a in arrays):
        return np.stack(arrays)
    return np.stack([_unit(a) for a in arrays])


def _idx_labels(folder: Path, prefix: str) -> tuple[Path, np.ndarray] | None:
    try:
        path = find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    except DataError:
        return None
    return path, read_idx_labels(path)


def load_idx_folder(folder: Path, split: str) -> ImageDataset:
    """Fashion-MNIST style IDX pair: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.

    The classes are 0..N-1 with N from the largest label of both splits, so a split that lacks the last class
    still has every class the other split has."""
    prefix = "train" if split == "train" else "t10k"
    path = find_idx(folder, f"{prefix}-images-idx3-ubyte")
    images = read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path}: images must have 3 dimensions (N, H, W), but its header gives shape {list(images.shape)}")
    if images.shape[0] == 0 or 0 in images.shape[1:]:
        raise DataError(f"{path}: no images (header gives shape {list(images.shape)})")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: pixels are {images.dtype.name}; only unsigned bytes (IDX type 0x08) are supported")
    found = _idx_labels(folder, prefix)
    if found is None:
        raise DataError(f"{folder} has no IDX file named {prefix}-labels-idx1-ubyte[.gz]")
    label_path, labels = found
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {prefix} images in {path.name} but {len(labels)} labels in {label_path.name}")
    other = _idx_labels(folder, "t10k" if prefix == "train" else "train")
    top = max(int(labels.max()), int(other[1].max()) if other is not None else 0)
    info = DataInfo(1, (int(images.shape[1]), int(images.shape[2])), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))
    x = _normalise(images[..., None], info)
    return ImageDataset(x, torch.from_numpy(labels), [str(i) for i in range(top + 1)], info)


def _class_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def split_classes(root: Path) -> list[str]:
    """The class names of an image-folder dataset: the sorted union of the class folders of the splits it loads
    (train, and test or else val), so that a class keeps its index in each split even where one split lacks it."""
    splits = ("train", "test") if (root / "test").is_dir() else ("train", "val")
    return sorted({name for split in splits if (root / split).is_dir() for name in _class_names(root / split)})


def _image_files(folder: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """The images under `folder/<class>/`, each labelled by its class's index in `classes` (default: the folder's own
    class folders), with the class list."""
    names = _class_names(folder)
    if not names:
        raise DataError(f"{folder} has no class sub-folders (expected <folder>/<class>/<image>)")
    classes = names if classes is None else classes
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for name in names:
        if name not in index:
            raise DataError(f"{folder / name} is not one of the classes {classes}")
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(index[name])
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, list(classes)


def _reason(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _is_grey(im) -> bool:
    """A grey mode, or a palette image whose used colours are all grey."""
    if im.mode in GREY_MODES:
        return True
    if im.mode not in ("P", "PA"):
        return False
    palette = np.asarray(im.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)
    used = np.unique(np.asarray(im.getchannel(0)))
    used = used[used < len(palette)]
    rgb = palette[used]
    return bool((rgb == rgb[:, :1]).all())


def _probe(files: list[Path]) -> tuple[int, tuple[int, int]]:
    """Channels (1 if every image is grey, else 3) and the most common size (H, W), from the image headers (and the
    palettes of palette images)."""
    from PIL import Image

    grey, sizes = True, {}
    for f in files:
        try:
            with Image.open(f) as im:
                grey = grey and _is_grey(im)
                sizes[(im.height, im.width)] = sizes.get((im.height, im.width), 0) + 1
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise DataError(f"cannot read image {f}: {_reason(exc)}") from None
    return (1 if grey else 3), max(sizes, key=sizes.get)


STATS_IMAGES = 2000


def _bit_depth(im, path: Path) -> int:
    """The largest value of a 16- or 32-bit integer image: 16-bit modes by name, mode I from the TIFF tags
    (BitsPerSample, SampleFormat) where it has them, else 16-bit (how PIL holds 16-bit samples)."""
    if im.mode.startswith("I;16"):
        return 2**15 - 1 if im.mode.endswith("S") else 2**16 - 1
    tags = getattr(im, "tag_v2", None)
    if tags is None or 258 not in tags:
        return 2**16 - 1
    bits, fmt = tags[258], tags.get(339, 1)
    bits, fmt = int(bits[0] if isinstance(bits, tuple) else bits), int(fmt[0] if isinstance(fmt, tuple) else fmt)
    if not 1 <= bits <= 32:
        raise DataError(f"image {path} has {bits}-bit integer samples; supported are up to 32 bits")
    return 2 ** (bits - 1) - 1 if fmt == 2 else 2**bits - 1


def _read_wide(im, path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A 16-bit, 32-bit integer or float image as float32 in [0, 1] `(H, W, C)`: integers divided by their bit depth's
    largest value (never clipped to 8 bits), floats taken as [0, 1] intensities."""
    from PIL import Image

    raw = np.asarray(im)
    if raw.ndim != 2:
        raise DataError(f"image {path} (mode {im.mode}) has {raw.ndim} dimensions; expected a single-channel image")
    if im.mode == "F":
        if not np.isfinite(raw).all() or raw.min() < 0 or raw.max() > 1:
            raise DataError(f"float image {path} holds values in [{raw.min():g}, {raw.max():g}]; float images must hold "
                            "intensities in [0, 1]")
        x = raw.astype(np.float32)
    else:
        top = _bit_depth(im, path)
        if raw.min() < 0 or raw.max() > top:
            raise DataError(f"image {path} (mode {im.mode}) holds values {raw.min()}..{raw.max()}, outside 0..{top} of its bit depth")
        x = (raw.astype(np.float64) / top).astype(np.float32)
    if x.shape != size:
        x = np.clip(np.asarray(Image.fromarray(x).resize((size[1], size[0])), dtype=np.float32), 0.0, 1.0)
    return np.repeat(x[..., None], channels, axis=2)


def _convert(im, mode: str):
    """`im.convert(mode)`, going through RGB/RGBA/LA for the modes PIL does not convert directly (LAB, La)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        try:
            return im.convert(mode)
        except ValueError:
            for via in ("RGB", "RGBA", "LA"):
                try:
                    return im.convert(via).convert(mode)
                except ValueError:
                    continue
            raise


def _read(f: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image `(H, W, C)` with `channels` channels at `size`: uint8 for 8-bit images (converted and resized as
    always), float32 in [0, 1] for 16-bit, 32-bit and float images."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            if im.mode in WIDE_MODES:
                return _read_wide(im, f, channels, size)
            im = _convert(im, "L" if channels == 1 else "RGB")
            if (im.height, im.width) != size:
                im = im.resize((size[1], size[0]))
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # any decoder or conversion failure of a user's file
        raise DataError(f"cannot read image {f}: {_reason(exc)}") from None
    return arr[..., None] if channels == 1 else arr


def folder_info(folder: Path) -> DataInfo:
    """The descriptor of an image folder (its train split): channels, size, per-channel mean/std of at most
    STATS_IMAGES evenly spaced images."""
    files, _, _ = _image_files(folder)
    channels, size = _probe(files)
    picked = files[:: max(1, len(files) // STATS_IMAGES)]
    px = torch.from_numpy(_unit(_stack([_read(f, channels, size) for f in picked]))).reshape(-1, channels)
    return DataInfo(channels, size, tuple(round(float(v), 4) for v in px.mean(0)),
                    tuple(round(float(v), 4) for v in px.std(0).clamp(min=1e-3)))


def load_image_folder(folder: Path, info: DataInfo | None = None, classes: list[str] | None = None) -> ImageDataset:
    """ImageNet-style folder: one sub-folder per class, images inside, at any size and channel count.

    Without `info` (a train split) the channels and size come from the images (grey if all are grey, else RGB; the
    most common size, others resized to it) and the normalisation from their per-channel mean and std
    (`folder_info`); a test split is loaded with its train split's `info`, so both are normalised alike. `classes`
    (default: this folder's class folders) fixes each class's label, so that splits agree.
    """
    files, labels, classes = _image_files(folder, classes)
    info = info or folder_info(folder)
    stack = _stack([_read(f, info.channels, info.size) for f in files])
    return ImageDataset(_normalise(stack, info), torch.tensor(labels, dtype=torch.int64), classes, info)


def _warn_missing(ds: ImageDataset, folder: Path) -> None:
    present = set(ds.labels.unique().tolist())
    missing = [f"'{c}' (index {i})" for i, c in enumerate(ds.classes) if i not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        warn(f"{folder} has no images of class {shown}; every class keeps its index, so labels agree across splits")


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
        split_dir = folder / split if (folder / split).is_dir() else folder / "val"
        ds = load_image_folder(split_dir, info, split_classes(folder))
        _warn_missing(ds, split_dir)
    else:
        raise DataError(f"{folder} holds neither IDX files nor a '{split}/' image folder")
    check_finite(ds.images, f"{split} images from {folder}")
    return ds
