"""Checks on a file a command is about to write (`export --out`, `cost --write-policy`, `fewshot --out`), made
before any work: never onto a folder, into a missing or read-only folder, over a file the command did not write
itself (unless `--force`), or into another job's run folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from metaaug.errors import ConfigError
from metaaug.runs.folder import CONFIG, RunFolder, probe_writable


def json_marked(mark: str) -> Callable[[Path], bool]:
    """Whether a file is a JSON object an earlier run of the command `mark` wrote (its `written_by` says so)."""
    def marked(path: Path) -> bool:
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("written_by") == mark
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    return marked


def check_output_file(path: str | Path, option: str, command: str, written_by_us: Callable[[Path], bool],
                      force: bool = False, own_run: RunFolder | None = None, own_names: tuple[str, ...] = ()) -> Path:
    """`path` if `command` may write it. `written_by_us(path)` says whether an existing file is one this command
    wrote (it may then be replaced); `own_run` is the run folder the command works on, whose own files (weights,
    config, report, checkpoints) are never replaced, except `own_names`, the files this command writes there by
    default, which `force` may replace (e.g. a `fewshot.json` written before files carried their writer's mark)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: its folder {parent} does not exist")
    probe_writable(parent, "folder")
    if (parent / CONFIG).is_file() and (own_run is None or parent.resolve() != own_run.path.resolve()):
        raise ConfigError(f"{option} {path} is inside another job's run folder {parent}; write it elsewhere")
    if own_run is not None and path.exists() and own_run.owns(path) and not written_by_us(path) and \
            not (force and path.name in own_names):
        hint = "; --force replaces it" if path.name in own_names else "; give another --out"
        raise ConfigError(f"{option} {path} is a file of the {own_run.kind} run that `{command}` did not write{hint}")
    if path.exists() and not written_by_us(path) and not force:
        raise ConfigError(f"{option} {path} exists and was not written by `{command}`; --force overwrites it")
    return path
