"""One run folder for every job kind (quantize, qat, search, synth): its kind and config guarded, its checkpoints
consistent, its files written atomically.

`config.json` holds `{"kind": ..., <config>}`. A folder of another kind, or of the same kind with another config, is
refused before anything is written; so is a non-empty folder that no metaaug job claimed. `restart=True` (the
CLI's `--restart` / `--force`) takes a folder of the same kind over: the files that kind writes are deleted first.

A checkpoint is a manifest `<name>.json` naming its part files (`<name>-<generation>.<part>.<ext>`) with their
SHA-256: the parts of a new generation are written first, then the manifest, then the old parts are removed. A kill
at any point leaves the manifest naming one complete generation, so a tensor file is never paired with an older
index, and a part that does not match its manifest is named in one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaaug.errors import ConfigError
from metaaug.runs import files
from metaaug.runs.files import RESTART_HINT, CorruptFileError

CONFIG = "config.json"
KINDS = ("quantize", "qat", "search", "synth")
# what each kind writes besides its config and checkpoints: removed by --restart, and a reader's guide to a folder
OUTPUTS: dict[str, tuple[str, ...]] = {
    "quantize": ("quantized.safetensors", "report.json", "export.json", "model.onnx", "model.mq.safetensors",
                 "transforms.png", "meta_losses.png", "progress.json", "progress-*",
                 "progress.safetensors", "progress_method.pt"),  # the last two: the layout before checkpoint manifests
    "qat": ("qat.safetensors", "bn_stats.safetensors", "report.json", "accuracy.png", "fewshot.json", "export.json",
            "w*.model.onnx", "w*.model.mq.safetensors", "qat_progress.json", "qat_progress-*", "qat_progress.pt"),
    "search": ("metaquant.pt", "policy.json", "search.json", "pareto.png", "generations.png", "metaquant_progress.json",
               "metaquant_progress-*", "metaquant_progress.pt", "search_state.json"),
    "synth": ("images.safetensors", "class_*.png", "report.json"),
}
COMMAND = {"quantize": "metaaug quantize", "qat": "metaaug qat", "search": "metaaug search", "synth": "metaaug synth"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Checkpoint:
    """One consistent generation of a checkpoint: its `info` (JSON) and its parts, read on demand."""

    folder: Path
    name: str
    info: dict[str, Any]
    parts: dict[str, str] = field(default_factory=dict)

    def tensors(self, part: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        return files.load_tensors(self.folder / self.parts[part], f"checkpoint part {part!r}", device)

    def object(self, part: str) -> Any:
        return files.load_object(self.folder / self.parts[part], f"checkpoint part {part!r}")

    def has(self, part: str) -> bool:
        return part in self.parts


class Checkpoints:
    """Named checkpoints in a folder (see the module docstring for the layout)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def manifest(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def save(self, name: str, info: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]] | None = None,
             objects: dict[str, Any] | None = None) -> None:
        """Write a new generation: `tensors` parts as safetensors, `objects` parts with torch.save, then the manifest."""
        old = self._read(name, verify=False)
        gen = (old.info.get("checkpoint", {}).get("generation", 0) if old else 0) + 1
        parts: dict[str, str] = {}
        for part, t in (tensors or {}).items():
            parts[part] = f"{name}-{gen:06d}.{part}.safetensors"
            files.save_tensors(self.folder / parts[part], t)
        for part, obj in (objects or {}).items():
            parts[part] = f"{name}-{gen:06d}.{part}.pt"
            files.save_object(self.folder / parts[part], obj)
        sums = {f: _sha256(self.folder / f) for f in parts.values()}
        files.write_json(self.manifest(name), {**info, "checkpoint": {"generation": gen, "parts": parts, "sha256": sums}})
        self._remove_others(name, set(parts.values()))

    def load(self, name: str) -> Checkpoint | None:
        """The last complete generation, or None when there is none; a part that does not match is one line."""
        return self._read(name, verify=True)

    def _read(self, name: str, verify: bool) -> Checkpoint | None:
        path = self.manifest(name)
        if not path.exists():
            return None
        info = files.read_json(path, "a checkpoint manifest")
        meta = info.get("checkpoint") if isinstance(info, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("parts"), dict):
            if not verify:
                return None
            raise CorruptFileError(f"{path} is not a checkpoint manifest (written by an older metaaug?); {RESTART_HINT}")
        if verify:
            for fname in meta["parts"].values():
                fpath = self.folder / fname
                if not fpath.is_file() or _sha256(fpath) != meta["sha256"].get(fname):
                    raise CorruptFileError(f"checkpoint part {fpath} is missing or does not match {path.name} "
                                           f"(truncated or edited); {RESTART_HINT}")
        return Checkpoint(self.folder, name, info, dict(meta["parts"]))

    def _remove_others(self, name: str, keep: set[str]) -> None:
        """Older generations' parts, and temp files a kill mid-write left of this checkpoint's files."""
        for f in [*self.folder.glob(f"{name}-*.*"), *self.folder.glob(f".{name}*.tmp-*")]:
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def save_training(self, name: str, info: dict[str, Any], module: torch.nn.Module, stateful: dict[str, Any],
                      extra: dict[str, Any] | None = None) -> None:
        """A training loop's checkpoint: the module's weights, each of `stateful`'s `state_dict()` (optimisers,
        schedulers) and `extra` (RNG states, permutations: tensors, numbers, lists) beside the JSON `info`."""
        state = {k: obj.state_dict() for k, obj in stateful.items()}
        self.save(name, info, tensors={"model": module.state_dict()}, objects={"state": {**state, "extra": extra or {}}})

    def load_training(self, name: str, module: torch.nn.Module, stateful: dict[str, Any], device: str = "cpu",
                      what: str = "this job") -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Restore what `save_training` wrote into `module` and `stateful`; returns (info, extra), or None when there
        is no checkpoint. A checkpoint that does not fit (another model, an edited file) is one line."""
        ckpt = self.load(name)
        if ckpt is None:
            return None
        saved = ckpt.object("state")
        try:
            module.load_state_dict(ckpt.tensors("model", device))
            for key, obj in stateful.items():
                obj.load_state_dict(saved[key])
            return ckpt.info, saved["extra"]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CorruptFileError(f"{self.manifest(name)} does not fit {what} ({type(err).__name__}); {RESTART_HINT}") from None

    def clear(self, name: str) -> None:
        self._remove_others(name, set())
        self.manifest(name).unlink(missing_ok=True)


def probe_writable(folder: Path, what: str) -> None:
    """Root ignores permission bits, so try a write: read-only mounts and immutable folders refuse it."""
    probe = folder / f".metaaug-probe-{id(folder)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{what} {folder} is not writable ({err.strerror or type(err).__name__})") from None


def matches(path: Path, kind: str) -> bool:
    """Whether `path` is named like a file a job of `kind` writes."""
    return path.is_file() and any(path.match(pattern) for pattern in OUTPUTS[kind])


def kind_of(config: dict[str, Any]) -> str:
    """Runs stored before kinds were recorded are quantize runs."""
    return str(config.get("kind", "quantize"))


class RunFolder:
    """A claimed run folder of one kind and config. `RunFolder.open(path)` reads an existing one."""

    def __init__(self, path: str | Path, kind: str, config: dict[str, Any] | None) -> None:
        self.path, self.kind = Path(path), kind
        self.config = config or {}
        self.checkpoints = Checkpoints(self.path)

    @classmethod
    def claim(cls, path: str | Path, kind: str, config: dict[str, Any], defaults: dict[str, Any] | None = None,
              restart: bool = False, make_parents: bool = True, option: str = "--out") -> RunFolder:
        """Claim `path` for a job of `kind` with `config`; refuse, in one line and before writing, any folder that
        holds something else. `defaults` (nested like `config`): a field stored before it existed matches its default."""
        path, config = cls.check(path, kind, config, defaults, restart, make_parents, option)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, kind, config)
        if restart:
            run.wipe()
        files.write_json(path / CONFIG, {"kind": kind, **config})
        return run

    @classmethod
    def check(cls, path: str | Path, kind: str, config: dict[str, Any], defaults: dict[str, Any] | None = None,
              restart: bool = False, make_parents: bool = True, option: str = "--out") -> tuple[Path, dict[str, Any]]:
        """What `claim` checks, writing nothing: jobs call it before any work, and claim once the work can start.
        `make_parents`: missing parent folders will be created below the nearest existing one, which must be a
        writable folder (False: the parent itself must exist)."""
        path = Path(path)
        config = json.loads(json.dumps(config))  # as stored: tuples compare as the lists JSON gives back
        config.pop("kind", None)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{option} {path} is a file, not a run folder; give a folder")
        if not path.exists():
            parent = path.parent
            if not parent.is_dir() and not make_parents:
                raise ConfigError(f"{option} {path}: its parent folder {parent} does not exist")
            existing = next(p for p in (parent, *parent.parents) if p.exists())
            if not existing.is_dir():
                raise ConfigError(f"{option} {path}: {existing} is a file, not a folder")
            probe_writable(existing, "folder")
        else:
            probe_writable(path, "run folder")
            cls._check_existing(path, kind, config, defaults, restart, option)
        return path, config

    @staticmethod
    def _check_existing(path: Path, kind: str, config: dict[str, Any], defaults: dict[str, Any] | None, restart: bool,
                        option: str) -> None:
        cfg_path = path / CONFIG
        if not cfg_path.exists():  # unclaimed: only a folder of this kind's own files (e.g. written before config.json) is taken
            others = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and not matches(p, kind))
            if others:
                raise ConfigError(f"{option} {path} holds files no metaaug {kind} job writes (e.g. {others[0]}); "
                                  "give an empty or new folder")
            return
        try:
            old = files.read_json(cfg_path, "a run config")
        except CorruptFileError:
            if restart:
                return
            raise
        if not isinstance(old, dict):
            raise CorruptFileError(f"{cfg_path} is not a run config; {RESTART_HINT}")
        old_kind = kind_of(old)
        if old_kind != kind:
            raise ConfigError(f"{option} {path} is a {old_kind} run folder (written by `{COMMAND.get(old_kind, old_kind)}`), "
                              f"not a {kind} one; give another folder")
        old.pop("kind", None)
        diff = changed_fields(old, config, json.loads(json.dumps(defaults or {})))
        if diff and not restart:
            raise ConfigError(f"{path} holds a run with a different config (differs in: {', '.join(diff)}); "
                              "use another --out, --restart to replace it, or delete the folder")

    @classmethod
    def open(cls, path: str | Path, kinds: tuple[str, ...] = KINDS, purpose: str = "read") -> RunFolder:
        """An existing run folder of one of `kinds`; anything else is one line saying what it is."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"run folder {path} does not exist")
        cfg_path = path / CONFIG
        if not cfg_path.exists():
            raise ConfigError(f"{path} is not a run folder ({CONFIG} missing)")
        config = files.read_json(cfg_path, "a run config")
        if not isinstance(config, dict):
            raise CorruptFileError(f"{cfg_path} is not a run config; {RESTART_HINT}")
        kind = kind_of(config)
        if kind not in kinds:
            wanted = " or ".join(f"`{COMMAND[k]}`" for k in kinds)
            raise ConfigError(f"{path} is a {kind} run folder; {purpose} needs a run written by {wanted}")
        config.pop("kind", None)
        return cls(path, kind, config)

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def require(self, name: str, what: str) -> Path:
        if not self.has(name):
            raise ConfigError(f"{self.path} holds no {what} ({name} missing); rerun `{COMMAND[self.kind]}` to finish it")
        return self.path / name

    def read_json(self, name: str, what: str = "JSON") -> Any:
        return files.read_json(self.path / name, what)

    def write_json(self, name: str, data: Any, indent: int | None = 2) -> None:
        files.write_json(self.path / name, data, indent)

    def owns(self, path: str | Path) -> bool:
        """Whether `path` is one of the files this run's job writes (its config, outputs or checkpoints)."""
        path = Path(path)
        if path.parent.resolve() != self.path.resolve():
            return False
        return path.name == CONFIG or matches(path, self.kind)

    def wipe(self) -> None:
        """Remove what this kind writes (--restart): outputs and checkpoints (manifests and parts, both in OUTPUTS),
        temp files a kill left, and the config."""
        for pattern in OUTPUTS[self.kind]:
            for f in self.path.glob(pattern):
                if f.is_file():
                    f.unlink()
        for tmp in self.path.glob(".*.tmp-*"):  # what a kill mid-write left
            tmp.unlink(missing_ok=True)
        (self.path / CONFIG).unlink(missing_ok=True)


def changed_fields(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """Fields (dotted paths) whose stored and requested values differ. A field present on one side only matches if
    its value is None or its default there: it was added (or dropped) after the run was stored."""
    out = []
    for key in sorted(set(old) | set(new)):
        if (key in old) != (key in new):
            value = new.get(key, old.get(key))
            if value is None or (key in defaults and defaults[key] == value):
                continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            out += changed_fields(a, b, sub if isinstance(sub, dict) else {}, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out
