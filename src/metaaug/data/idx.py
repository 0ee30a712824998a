"""Reader for the IDX format used by (Fashion-)MNIST, gzipped or not."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from metaaug.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file into a numpy array (magic number, dims, then raw big-endian data); a header that does not
    match the bytes after it is refused rather than read as garbage."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except Exception as exc:  # OSError, EOFError, zlib.error from a damaged .gz
        raise DataError(f"cannot read IDX file {path}: {type(exc).__name__}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    start = 4 + 4 * ndim
    if ndim == 0:
        raise DataError(f"{path}: the IDX header gives no dimensions")
    if len(raw) < start:
        raise DataError(f"{path}: the header promises {ndim} dimensions but the file ends after {len(raw)} bytes (truncated file?)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[raw[2]])
    expected, held = math.prod(dims) * dtype.itemsize, len(raw) - start
    if held != expected:
        why = "truncated file?" if held < expected else "trailing data"
        raise DataError(f"{path}: header says {dims} ({expected} data bytes) but the file holds {held} ({why})")
    return np.frombuffer(raw, dtype=dtype, offset=start).reshape(dims)


def read_idx_labels(path: Path) -> np.ndarray:
    """An IDX label file as int64 class indices 0..N-1: one whole, non-negative number per image."""
    labels = read_idx(path)
    if labels.ndim != 1:
        raise DataError(f"{path}: a label file holds one number per image, but its header gives shape {list(labels.shape)}")
    if labels.size == 0:
        raise DataError(f"{path}: no labels")
    whole = np.isfinite(labels) & (labels == np.round(labels)) & (labels < 2**31) if labels.dtype.kind == "f" else None
    if whole is not None and not whole.all():
        raise DataError(f"{path}: label {labels[~whole][0]:g} is not a class index (labels must be whole numbers 0..N-1)")
    if labels.min() < 0:
        raise DataError(f"{path}: label {labels.min():g} is negative (labels must be class indices 0..N-1)")
    return labels.astype(np.int64)


def find_idx(folder: Path, stem: str) -> Path:
    """Locate `stem` in `folder` with or without `.gz`, accepting the `-idx3-ubyte` / `.idx3-ubyte` spellings."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            cand = folder / f"{name}{suffix}"
            if cand.exists():
                return cand
    raise DataError(f"{folder} has no IDX file named {stem}[.gz]")
