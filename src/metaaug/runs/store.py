"""A quantize run's folder: config, progress after each unit (for resume), the quantized weights and the report."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from metaaug.errors import ConfigError
from metaaug.progress import UnitStats
from metaaug.quant.prepare import QuantModel
from metaaug.runs import files
from metaaug.runs.files import RESTART_HINT, CorruptFileError
from metaaug.runs.folder import Checkpoint, RunFolder

QUANTIZED, REPORT, PROGRESS = "quantized.safetensors", "report.json", "progress"
LEGACY_STATE, LEGACY_METHOD = "progress.safetensors", "progress_method.pt"  # before checkpoint manifests


def model_state(qmodel: QuantModel) -> dict:
    """All parameters and buffers of the fake-quant model (FP folded weights, steps, rounding)."""
    return {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}


def apply_state(qmodel: QuantModel, state: dict, source: Path | str) -> None:
    missing, unexpected = qmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{source} does not match this model/config ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for aq in qmodel.act_quantizers():
        aq.scale.requires_grad_(False)


def load_state(qmodel: QuantModel, path: Path) -> None:
    apply_state(qmodel, files.load_tensors(path, "quantized weights"), path)


class RunStore:
    """Progress of one quantize run in `out/`; refuses a folder that holds another kind of run or another config."""

    def __init__(self, out: str | Path, config: dict[str, Any], defaults: dict[str, Any] | None = None,
                 restart: bool = False) -> None:
        """`defaults`: the default of each field, nested like `config`, so that a run stored before a field existed
        still matches a config that leaves the new field at its default."""
        self.folder = RunFolder.claim(out, "quantize", config, defaults, restart)
        self.out = self.folder.path
        self.opened = time.perf_counter()
        self.prior_seconds = 0.0  # time the run had spent up to its last save before this process: see `elapsed`
        self.resumed_units = 0
        self._checkpoint: Checkpoint | None = None

    def restore(self, qmodel: QuantModel) -> tuple[int, list]:
        """Load the saved progress into `qmodel`; returns (units done, their stats)."""
        ckpt = self._checkpoint = self._legacy() or self.folder.checkpoints.load(PROGRESS)
        if ckpt is None:
            return 0, []
        apply_state(qmodel, ckpt.tensors("state"), self.out / ckpt.parts["state"])
        info = ckpt.info
        try:
            self.resumed_units, self.prior_seconds = int(info["units_done"]), float(info.get("elapsed", 0.0))
            return self.resumed_units, [UnitStats(**s) for s in info["units"]]
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{self.folder.checkpoints.manifest(PROGRESS)} lacks the unit progress; {RESTART_HINT}") from None

    def _legacy(self) -> Checkpoint | None:
        """Progress written by metaaug before checkpoint manifests (progress.json beside progress.safetensors and, for
        MetaAug, progress_method.pt), read as it is; the next save replaces it with a manifest."""
        manifest = self.folder.checkpoints.manifest(PROGRESS)
        if not (manifest.is_file() and self.folder.has(LEGACY_STATE)):
            return None
        info = files.read_json(manifest, "a checkpoint manifest")
        if not isinstance(info, dict) or "checkpoint" in info:
            return None
        parts = {"state": LEGACY_STATE, **({"method": LEGACY_METHOD} if self.folder.has(LEGACY_METHOD) else {})}
        return Checkpoint(self.out, PROGRESS, info, parts)

    def elapsed(self) -> float:
        """Seconds the run has taken so far, across resumes: the time up to the last save of an interrupted attempt
        counts, so a resumed run reports its whole cost, not only what came after the resume."""
        return self.prior_seconds + time.perf_counter() - self.opened

    def save(self, qmodel: QuantModel, units_done: int, stats: list, method_state: dict | None = None) -> None:
        """Progress after a unit, as one checkpoint: the model state, `method_state` (tensors, numbers, strings,
        lists, dicts: what the method needs to resume exactly, e.g. MetaAug's T) and the unit count."""
        info = {"units_done": units_done, "units": [dataclasses.asdict(s) for s in stats], "elapsed": round(self.elapsed(), 3)}
        self.folder.checkpoints.save(PROGRESS, info, tensors={"state": model_state(qmodel)},
                                     objects={} if method_state is None else {"method": method_state})
        for legacy in (LEGACY_STATE, LEGACY_METHOD):  # the manifest now holds the progress: the old layout goes
            self.folder.file(legacy).unlink(missing_ok=True)

    def restore_method_state(self) -> dict | None:
        """The method state saved with the progress (loaded with `weights_only=True`), or None if there is none."""
        ckpt = self._checkpoint
        if ckpt is None or not ckpt.has("method"):
            return None
        return ckpt.object("method")

    def finish(self, qmodel: QuantModel, report: dict[str, Any]) -> None:
        files.save_tensors(self.out / QUANTIZED, model_state(qmodel))
        self.folder.write_json(REPORT, report)
