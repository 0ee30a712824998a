"""Reader for the IDX format used by (Fashion-)MNIST, gzipped or not."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from metaaug.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file into a numpy array (magic number, dims, then raw big-endian data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} values (truncated file?)")
    return data.reshape(dims)


def find_idx(folder: Path, stem: str) -> Path:
    """Locate `stem` in `folder` with or without `.gz`, accepting the `-idx3-ubyte` / `.idx3-ubyte` spellings."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            cand = folder / f"{name}{suffix}"
            if cand.exists():
                return cand
    raise DataError(f"{folder} has no IDX file named {stem}[.gz]")
