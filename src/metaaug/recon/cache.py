"""Where the engine keeps a unit's cached tensors (FP input, quantized input, FP output) under a memory budget.

A cache tensor holds one row per calibration image. It lives in memory while the budget allows; past it, it is
spilled to a file read back with `pread` (not memory-mapped, so the rows read do not count against the process's
resident memory). Rows may be stored in bfloat16/float16 to halve both, converted back to float32 when read. At
float32 a spilled tensor reads back the same bits, so a spill changes speed, never the result.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaaug.errors import ConfigError

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SLICE_BYTES = 64 << 20  # input bytes per slice of a whole-set pass (caching, evaluation): 256+ images at 28x28
DEFAULT_FRACTION = 0.5  # of the memory free when the run starts: the rest is for the model, a unit's work, the OS
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40}


def parse_size(text: str | int) -> int:
    """'2GB', '512MB', '1.5G', '800KB' or a number of bytes (K/M/G are 1024-based) -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", str(text).upper())
        if match is None:
            raise ConfigError(f"--cache-budget {text!r}: give a size such as 2GB, 512MB or 800KB")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ConfigError(f"--cache-budget {text!r}: the budget must be positive")
    return size


def human(size: int) -> str:
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"


def free_memory(device: torch.device) -> int | None:
    """Bytes free for caches on `device` now (Linux MemAvailable, CUDA's free memory); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def slice_rows(row_shape: tuple[int, ...] | torch.Size, limit: int) -> int:
    """At most `limit` rows per slice, and no more than SLICE_BYTES of float32 input: a 224x224 pass stays small."""
    return max(1, min(limit, SLICE_BYTES // max(1, math.prod(row_shape) * 4)))


def is_rows(value: Any) -> bool:
    """A cached batch-major tensor: a plain tensor or one of this module's stored rows."""
    return isinstance(value, torch.Tensor | StoredRows)


def take_rows(rows: torch.Tensor | StoredRows, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of a cached batch-major tensor. A plain tensor gathers them with `index_select`: the same values as
    `rows[idx]`, but whole-row copies instead of advanced indexing, which is several times slower on a CPU; the
    reconstruction step draws three such batches per iteration."""
    if isinstance(rows, torch.Tensor):
        return rows.index_select(0, idx.to(rows.device))
    return rows[idx]


class StoredRows:
    """A batch-major tensor stored in a smaller dtype and/or a file; indexing returns float32 rows on `device`.

    Supports what the engine does with a cache tensor: `.shape`, `len`, `[i:j]`, `[index_tensor]`, `.to(device)`.
    """

    def __init__(self, shape: tuple[int, ...], store_dtype: torch.dtype, dtype: torch.dtype, device: torch.device,
                 path: Path | None) -> None:
        self.shape = torch.Size(shape)
        self.store_dtype, self.dtype, self.device, self.path = store_dtype, dtype, device, path
        self.row_numel = 1
        for d in shape[1:]:
            self.row_numel *= d
        self.row_bytes = self.row_numel * torch.empty((), dtype=store_dtype).element_size()
        if path is None:
            self.data: torch.Tensor | None = torch.empty(shape, dtype=store_dtype, device=device)
            self.fd = None
        else:
            self.data = None
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self.fd, self.nbytes)
            weakref.finalize(self, _remove, self.fd, path)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, start: int, rows: torch.Tensor) -> None:
        rows = rows.detach().to(self.store_dtype)
        if self.data is not None:
            self.data[start : start + rows.shape[0]].copy_(rows)
            return
        buf = rows.cpu().contiguous().view(torch.uint8).numpy().tobytes()
        os.pwrite(self.fd, buf, start * self.row_bytes)

    def _read(self, start: int, count: int) -> torch.Tensor:
        buf = bytearray(count * self.row_bytes)
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self.fd, [view[done:]], start * self.row_bytes + done)
            if got <= 0:
                raise OSError(f"short read from the cache file {self.path}")
            done += got
        return torch.frombuffer(buf, dtype=self.store_dtype).view(count, *self.shape[1:])

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                raise IndexError("stored rows support unit-step slices only")
            rows = self.data[start:stop] if self.data is not None else self._read(start, max(stop - start, 0))
        else:
            index = torch.as_tensor(index, dtype=torch.long).cpu()
            if self.data is not None:
                rows = take_rows(self.data, index)
            else:
                rows = torch.stack([self._read(int(i), 1)[0] for i in index]) if index.numel() else \
                    torch.empty((0, *self.shape[1:]), dtype=self.store_dtype)
        return rows.to(self.device).to(self.dtype)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """The whole tensor, materialised (float32) on `device`."""
        return self[0 : self.shape[0]].to(device, non_blocking=non_blocking)


def _remove(fd: int, path: Path) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)


@dataclass
class CacheSettings:
    """Where a job's unit caches live: a budget in bytes (None: a share of the memory free at the start) and where
    spilled files go (None: a temporary folder). The storage dtype is the method config's `cache_dtype`, since it
    changes the result and these do not."""

    budget: int | str | None = None
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        if self.budget is not None:
            self.budget = parse_size(self.budget)
        if self.spill_dir is not None and Path(self.spill_dir).exists() and not Path(self.spill_dir).is_dir():
            raise ConfigError(f"--cache-dir {self.spill_dir} is a file, not a folder")


@dataclass
class Cache:
    """Allocates cache tensors in memory until the budget is reached and in files after; tracks what lived where."""

    settings: CacheSettings
    device: torch.device
    dtype: str = "float32"
    budget: int = 0
    budget_source: str = ""
    resident: int = 0
    peak_memory: int = 0
    on_disk: int = 0
    peak_disk: int = 0
    spilled: list[str] = field(default_factory=list)
    folder: Path | None = None

    def __post_init__(self) -> None:
        if self.settings.budget is not None:
            self.budget, self.budget_source = self.settings.budget, "--cache-budget"
        else:
            free = free_memory(self.device)
            self.budget = int(free * DEFAULT_FRACTION) if free else 1 << 62
            self.budget_source = (f"default: {int(DEFAULT_FRACTION * 100)}% of the {human(free)} free at the start"
                                  if free else "default: free memory unknown, no limit")
        self.store_dtype = CACHE_DTYPES[self.dtype]

    def track(self, tensor: torch.Tensor) -> None:
        """Count a tensor made outside the cache (the calibration images) against the budget while it lives."""
        self._count(tensor, tensor.numel() * tensor.element_size(), memory=True)

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor | StoredRows:
        """An empty cache tensor of `shape` (rows filled by the caller): a plain tensor when it fits in memory at
        float32, stored rows otherwise."""
        numel = 1
        for d in shape:
            numel *= d
        low = self.store_dtype if dtype == torch.float32 else dtype
        nbytes = numel * torch.empty((), dtype=low).element_size()
        if self.resident + nbytes <= self.budget:
            if low == dtype:
                out: torch.Tensor | StoredRows = torch.empty(shape, dtype=dtype, device=self.device)
            else:
                out = StoredRows(shape, low, dtype, self.device, None)
            self._count(out, nbytes, memory=True)
            return out
        if self.folder is None:
            base = self.settings.spill_dir
            if base is not None:
                Path(base).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="metaaug-cache-", dir=base))
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        out = StoredRows(shape, low, dtype, self.device, self.folder / f"{len(self.spilled)}.bin")
        self.spilled.append(name)
        self._count(out, nbytes, memory=False)
        return out

    def _count(self, obj: object, nbytes: int, memory: bool) -> None:
        if memory:
            self.resident += nbytes
            self.peak_memory = max(self.peak_memory, self.resident)
        else:
            self.on_disk += nbytes
            self.peak_disk = max(self.peak_disk, self.on_disk)
        weakref.finalize(obj, self._release, nbytes, memory)

    def _release(self, nbytes: int, memory: bool) -> None:
        if memory:
            self.resident -= nbytes
        else:
            self.on_disk -= nbytes

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def summary(self) -> dict[str, Any]:
        """The report's `cache` entry: the budget, the storage dtype, and where the caches lived."""
        where = "memory" if not self.spilled else ("disk" if self.peak_memory == 0 else "memory+disk")
        return {
            "where": where, "budget": human(self.budget), "budget_source": self.budget_source, "dtype": self.dtype,
            "peak_memory": human(self.peak_memory), "peak_disk": human(self.peak_disk),
            "spilled_tensors": len(self.spilled), "spill_dir": None if self.folder is None else str(self.folder.parent),
        }
