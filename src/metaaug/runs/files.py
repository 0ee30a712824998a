"""Files a job writes and reads back: every write atomic (temp file, fsync, rename, fsync of the folder), every read
of a truncated or foreign file one line naming the file and what to do.

`METAAUG_KILL_AT` (tests only) kills the process with SIGKILL at a write point: `N` after the N-th atomic write of
the process has been renamed into place, `N.tmp` after its temp file is written but before the rename. The kill
tests walk N over every write of a job and check that the rerun resumes to the uninterrupted result.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metaaug.errors import ConfigError

RESTART_HINT = "rerun with --restart to start over, or delete the folder"
_writes = 0


class CorruptFileError(ConfigError):
    """A file a job wrote cannot be read back: truncated by a kill mid-write, edited, or from somewhere else."""


def _kill_point(tmp: bool) -> None:
    spec = os.environ.get("METAAUG_KILL_AT")
    if spec and spec == (f"{_writes}.tmp" if tmp else str(_writes)):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open a folder for fsync; the rename still holds
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; on success it is synced and renamed over `path`, on failure removed,
    so `path` always holds either its old content or the complete new one."""
    global _writes
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _writes += 1
        _kill_point(tmp=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    _kill_point(tmp=False)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_object(path: str | Path, obj: Any) -> None:
    """torch.save of tensors, numbers, strings, lists and dicts (read back with `weights_only=True`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _corrupt(path: Path, what: str, err: BaseException, hint: str) -> CorruptFileError:
    reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    return CorruptFileError(f"{path} cannot be read as {what} ({reason}): truncated or not written by metaaug; {hint}")


def read_json(path: str | Path, what: str = "JSON", hint: str = RESTART_HINT) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _corrupt(path, what, err, hint) from None


def load_tensors(path: str | Path, what: str = "a tensor file", device: str = "cpu", hint: str = RESTART_HINT) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own error types for truncated headers and data
        raise _corrupt(path, what, err, hint) from None


def load_object(path: str | Path, what: str = "saved progress", hint: str = RESTART_HINT) -> Any:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle with foreign objects: never unpickled, named instead
        raise _corrupt(path, what, err, hint) from None
