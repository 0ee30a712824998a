"""A run folder: config, progress after each unit (for resume), the quantized weights and the report."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metaaug.errors import ConfigError
from metaaug.progress import UnitStats
from metaaug.quant.prepare import QuantModel

CONFIG, PROGRESS, PROGRESS_STATE, METHOD_STATE, QUANTIZED, REPORT = (
    "config.json", "progress.json", "progress.safetensors", "progress_method.pt", "quantized.safetensors", "report.json")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_state(qmodel: QuantModel, path: Path) -> None:
    """All parameters and buffers of the fake-quant model (FP folded weights, steps, rounding) as safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_state(qmodel: QuantModel, path: Path) -> None:
    state = load_file(str(path))
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path} does not match this model/config ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for aq in qmodel.act_quantizers():
        aq.scale.requires_grad_(False)


class RunStore:
    """Progress of one run in `out/`; refuses a folder that holds a different config."""

    def __init__(self, out: str | Path, config: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
        """`defaults`: the default of each field, nested like `config`, so that a run stored before a field existed
        still matches a config that leaves the new field at its default."""
        self.out = Path(out)
        self.config = config = json.loads(json.dumps(config))  # as stored: tuples compare as the lists JSON gives back
        cfg_path = self.out / CONFIG
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            diff = changed_fields(old, config, json.loads(json.dumps(defaults or {})))
            if diff:
                raise ConfigError(f"{self.out} holds a run with a different config (differs in: {', '.join(diff)}); "
                                  "use another --out or delete the folder")
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(cfg_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.opened = time.perf_counter()
        self.prior_seconds = 0.0  # time the run had spent up to its last save before this process: see `elapsed`
        self.resumed_units = 0

    def restore(self, qmodel: QuantModel) -> tuple[int, list]:
        """Load the saved progress into `qmodel`; returns (units done, their stats)."""
        prog, state = self.out / PROGRESS, self.out / PROGRESS_STATE
        if not (prog.exists() and state.exists()):
            return 0, []
        info = json.loads(prog.read_text())
        load_state(qmodel, state)
        self.resumed_units, self.prior_seconds = int(info["units_done"]), float(info.get("elapsed", 0.0))
        return self.resumed_units, [UnitStats(**s) for s in info["units"]]

    def elapsed(self) -> float:
        """Seconds the run has taken so far, across resumes: the time up to the last save of an interrupted attempt
        counts, so a resumed run reports its whole cost, not only what came after the resume."""
        return self.prior_seconds + time.perf_counter() - self.opened

    def save(self, qmodel: QuantModel, units_done: int, stats: list, method_state: dict | None = None) -> None:
        """Progress after a unit; `method_state` (tensors, numbers, strings, lists, dicts) is what the method needs
        to resume exactly, e.g. MetaAug's T. It is written before the unit count, so a count never outruns it."""
        if method_state is not None:
            tmp = self.out / (METHOD_STATE + ".tmp")
            torch.save(method_state, tmp)
            os.replace(tmp, self.out / METHOD_STATE)
        save_state(qmodel, self.out / PROGRESS_STATE)
        _atomic_write(self.out / PROGRESS, json.dumps(
            {"units_done": units_done, "units": [dataclasses.asdict(s) for s in stats], "elapsed": round(self.elapsed(), 3)},
            indent=2) + "\n")

    def restore_method_state(self) -> dict | None:
        """The method state saved with the progress (loaded with `weights_only=True`), or None if there is none."""
        path = self.out / METHOD_STATE
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: say which, not a pickle trace
            raise ConfigError(f"{path} cannot be read as saved method progress ({type(err).__name__}); "
                              "delete the run folder to start over") from None

    def finish(self, qmodel: QuantModel, report: dict[str, Any]) -> None:
        save_state(qmodel, self.out / QUANTIZED)
        _atomic_write(self.out / REPORT, json.dumps(report, indent=2) + "\n")


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


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


