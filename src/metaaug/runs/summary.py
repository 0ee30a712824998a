"""Run folders as rows of a comparison (`metaaug runs`): what each kind of job wrote, read back without running
anything, so that finished, unfinished and damaged runs can be listed side by side. No printing here.

One folder never stops the listing: a file that cannot be read gives a row "corrupt: <file>", a folder with a
config but no result gives a row "in progress: ..." (a run still going, or one that was interrupted). Only the
arguments themselves are refused (a missing folder, one holding no run), in one line.

A QAT report holds no cost; a QAT width's weight memory and BOPs are the cost model's figure for that uniform width
(what `metaaug cost --wbits W --abits A` reports: first and last layers at 8 bits, BatchNorm folded as in the PTQ
runs), from one prepare and one forward pass of the run's model per distinct model, or unknown when the model cannot
be built here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaaug.errors import ConfigError
from metaaug.qat.trainer import CHECKPOINT as QAT_CHECKPOINT
from metaaug.runs import files
from metaaug.runs.files import CorruptFileError
from metaaug.runs.folder import CONFIG, KINDS, RunFolder, kind_of
from metaaug.runs.store import PROGRESS as STORE_PROGRESS
from metaaug.runs.store import REPORT
from metaaug.search.job import NET_FILE as META_NET
from metaaug.search.job import NET_PROGRESS
from metaaug.search.job import STATE_FILE as SEARCH_STATE

SEARCH = "search.json"
PROGRESS, QAT_PROGRESS, META_PROGRESS = (f"{name}.json" for name in (STORE_PROGRESS, QAT_CHECKPOINT, NET_PROGRESS))  # manifests
DONE = "done"
_WIDTH = re.compile(r"w(\d+)a(\d+)")
# bits that mark the layers a uniform width changes when the cost of a QAT width is worked out (see `uniform_cost`)
_PROBE_WBITS, _PROBE_ABITS = 2, 3


@dataclass
class RunRow:
    """One line of the comparison: a run, or one width of a QAT run. None: not known for this run."""

    folder: str
    kind: str
    model: str | None = None
    method: str | None = None
    bits: str | None = None  # "W2A4" (uniform), "policy" (per-layer bits), "w4a4" (a QAT width)
    top1: float | None = None
    weight_kb: float | None = None
    bops: int | None = None
    seconds: float | None = None
    resumed: bool | None = None
    status: str = DONE  # or "in progress: ...", "corrupt: <file>", "unknown kind ..."
    note: str = ""  # what the figures mean where they differ from a quantize run's (held-out top-1, synthetic images)
    mixed: bool = False  # per-layer bits: a policy run or a search result
    heldout: bool = False  # top-1 on held-out calibration images (a search), not the test split
    avg_wbits: float | None = None
    fp_top1: float | None = None  # the FP model's test top-1: the reference a quantized top-1 is read against

    @property
    def finished(self) -> bool:
        return self.status == DONE

    @property
    def method_bits(self) -> str:
        return " ".join(p for p in (self.method, self.bits) if p)

    def x(self, axis: str) -> float | None:
        """Where the row lies on the plot's x axis: weight memory in KB, or BOPs."""
        return self.weight_kb if axis == "memory" else None if self.bops is None else float(self.bops)


class _Corrupt(Exception):
    """A file of the folder that cannot be read, or does not hold what its job writes."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def run_folders(dirs: Iterable[str | Path]) -> list[Path]:
    """The run folders `dirs` name: each one a run folder itself (it has a config.json), or a folder of run folders
    (expanded one level). A missing folder, or one with no run in it, is one line."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.exists():
            raise ConfigError(f"{d} does not exist")
        if not d.is_dir():
            raise ConfigError(f"{d} is a file; give a run folder or a folder of run folders")
        if (d / CONFIG).is_file():
            found.append(d)
            continue
        try:
            subs = sorted((p for p in d.iterdir() if p.is_dir() and (p / CONFIG).is_file()), key=lambda p: p.name)
        except OSError as err:
            raise ConfigError(f"{d} cannot be listed ({err.strerror or type(err).__name__})") from None
        if not subs:
            raise ConfigError(f"{d} holds no run folder ({CONFIG} in neither it nor its subfolders)")
        found += subs
    seen: set[Path] = set()
    unique = []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def summarize(dirs: Iterable[str | Path]) -> list[RunRow]:
    """Rows for every run folder in `dirs`, grouped by model, then by folder, a QAT run's widths lowest first."""
    rows = [(i, row) for path in run_folders(dirs) for i, row in enumerate(read_run(path))]
    rows.sort(key=lambda r: (r[1].model is None, r[1].model or "", r[1].folder, r[0]))
    return [row for _, row in rows]


def read_run(path: str | Path) -> list[RunRow]:
    """The rows of one run folder (one per width for a QAT run); never raises for what the folder holds."""
    folder = str(path)
    try:
        run = RunFolder.open(path, KINDS, "metaaug runs")
    except CorruptFileError:
        return [RunRow(folder, "?", status=f"corrupt: {CONFIG}")]
    except ConfigError:  # a kind this version does not know (the config was readable), or a folder gone meanwhile
        try:
            kind = kind_of(files.read_json(Path(path) / CONFIG))
        except ConfigError:
            return [RunRow(folder, "?", status=f"unreadable: {CONFIG}")]
        return [RunRow(folder, kind, status=f"unknown kind {kind!r}")]
    reader = {"quantize": _quantize, "qat": _qat, "search": _search, "synth": _synth}[run.kind]
    try:
        return reader(run, folder)
    except _Corrupt as bad:
        return [RunRow(folder, run.kind, _text(run.config.get("model")), status=f"corrupt: {bad.name}")]
    except (TypeError, ValueError, KeyError, AttributeError):  # a file of the right syntax holding values of another shape
        return [RunRow(folder, run.kind, status="corrupt: its config or progress holds unexpected values")]


def _json(run: RunFolder, name: str) -> Any:
    try:
        return run.read_json(name)
    except CorruptFileError:
        raise _Corrupt(name) from None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _number(value: Any, name: str, optional: bool = True) -> float | None:
    """A figure from a job's JSON; anything but a number (a hand-edited or foreign file) makes the file corrupt."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Corrupt(name)
    return float(value)


def _dict(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Corrupt(name)
    return value


def _cost(cost: Any, name: str) -> tuple[float | None, int | None, float | None]:
    """(weight KB, BOPs, average weight bits) of a `policy_cost` dict; unknown when the job wrote none."""
    if cost is None:
        return None, None, None
    cost = _dict(cost, name)
    bops = _number(cost.get("bops"), name)
    return _number(cost.get("weight_kb"), name), None if bops is None else int(bops), _number(cost.get("avg_wbits"), name)


def _manifest_info(run: RunFolder, name: str) -> dict[str, Any] | None:
    """A checkpoint manifest's info (`units_done`, `step`, ...), None when the job has saved none yet."""
    return _dict(_json(run, name), name) if run.has(name) else None


def _quantize(run: RunFolder, folder: str) -> list[RunRow]:
    cfg = run.config
    if not run.has(REPORT):
        info = _manifest_info(run, PROGRESS)
        done = 0 if info is None else int(_number(info.get("units_done", 0), PROGRESS) or 0)
        bits = "policy" if cfg.get("policy") else f"W{cfg.get('wbits', '?')}A{cfg.get('abits', '?')}"
        return [RunRow(folder, "quantize", _text(cfg.get("model")), _text(cfg.get("method")), bits, mixed=bits == "policy",
                       status=f"in progress: {done} unit{'s' * (done != 1)} done")]
    r = _dict(_json(run, REPORT), REPORT)
    try:
        mixed = r.get("policy") is not None
        kb, bops, avg = _cost(r.get("cost"), REPORT)
        return [RunRow(folder, "quantize", str(r["model"]), str(r["method"]), "policy" if mixed else f"W{int(r['wbits'])}A{int(r['abits'])}",
                       top1=_number(r["quant_top1"], REPORT, optional=False), weight_kb=kb, bops=bops,
                       seconds=_number(r.get("seconds"), REPORT), resumed=bool(_number(r.get("resumed_units", 0), REPORT)),
                       mixed=mixed, avg_wbits=avg, fp_top1=_number(r.get("fp_top1"), REPORT))]
    except (KeyError, TypeError, ValueError):
        raise _Corrupt(REPORT) from None


def _width(name: str) -> tuple[int, int] | None:
    m = _WIDTH.fullmatch(name)
    return None if m is None else (int(m[1]), int(m[2]))


def _qat(run: RunFolder, folder: str) -> list[RunRow]:
    cfg = run.config
    qat = cfg.get("qat") if isinstance(cfg.get("qat"), dict) else {}
    method = _text(qat.get("method"))
    if not run.has(REPORT):
        info = _manifest_info(run, QAT_PROGRESS)
        if info is None:
            status = "in progress: training not started"
        else:
            step, epochs = int(_number(info.get("step", 0), QAT_PROGRESS) or 0), len(info.get("history") or [])
            total = f"/{qat['steps']}" if qat.get("steps") else ""
            status = f"in progress: step {step}{total}, {epochs}/{qat.get('epochs', '?')} epochs done"
        bits = ",".join(map(str, qat.get("bits") or []))
        return [RunRow(folder, "qat", _text(cfg.get("model")), method, bits and f"bits {bits}", status=status)]
    r = _dict(_json(run, REPORT), REPORT)
    try:
        top1, unseen = _dict(r["top1"], REPORT), _dict(r.get("unseen_top1") or {}, REPORT)
        names = [(str(n), top1[n], "") for n in r["widths"]] + [(str(n), v, "unseen width (interpolated quantizers)")
                                                                  for n, v in unseen.items()]
        rows = []
        for name, acc, note in names:
            width = _width(name)
            cost = None if width is None else uniform_cost(str(cfg.get("model", r["model"])), cfg.get("weights"), cfg.get("data_dir"), *width)
            kb, bops, avg = _cost(cost, REPORT)
            rows.append(RunRow(folder, "qat", str(r["model"]), str(r.get("method", method)), name,
                               top1=_number(acc, REPORT, optional=False), weight_kb=kb, bops=bops,
                               seconds=_number(r.get("seconds"), REPORT), note=note, avg_wbits=avg,
                               fp_top1=_number(r.get("fp_top1_before"), REPORT)))
        rows.sort(key=lambda row: (bool(row.note), _width(row.bits or "") or (99, 99)))
        return rows
    except (KeyError, TypeError, ValueError):
        raise _Corrupt(REPORT) from None


def _search(run: RunFolder, folder: str) -> list[RunRow]:
    cfg = run.config
    method = f"{cfg.get('proxy', 'metaquant')}-{cfg.get('strategy', 'ga')}"
    if not run.has(SEARCH):
        ga = cfg.get("ga") if isinstance(cfg.get("ga"), dict) else {}
        meta = cfg.get("meta") if isinstance(cfg.get("meta"), dict) else {}
        if run.has(SEARCH_STATE):
            state = _dict(_json(run, SEARCH_STATE), SEARCH_STATE)
            status = f"in progress: generation {state.get('generation', '?')}/{ga.get('generations', '?')}"
        elif run.has(META_NET):
            status = "in progress: MetaQuantNet trained, search not started"
        elif (info := _manifest_info(run, META_PROGRESS)) is not None:
            status = f"in progress: MetaQuantNet step {info.get('step', '?')}/{meta.get('steps', '?')}"
        else:
            status = "in progress: not started"
        return [RunRow(folder, "search", _text(cfg.get("model")), method, "policy", mixed=True, heldout=True, status=status)]
    s = _dict(_json(run, SEARCH), SEARCH)
    try:
        best, budget = _dict(s["best"], SEARCH), _dict(s.get("budget") or {}, SEARCH)
        kb, bops, avg = _cost(best.get("cost"), SEARCH)
        seconds = s.get("seconds")
        limit = f", budget {budget['kind']} <= {budget['limit']:g}" if "kind" in budget and "limit" in budget else ""
        return [RunRow(folder, "search", _text(cfg.get("model")), method, "policy", top1=_number(best["top1"], SEARCH, optional=False),
                       weight_kb=kb, bops=bops, seconds=_number(seconds.get("total") if isinstance(seconds, dict) else seconds, SEARCH),
                       note=f"top-1 on held-out calibration images{limit}", mixed=True, heldout=True, avg_wbits=avg)]
    except (KeyError, TypeError, ValueError):
        raise _Corrupt(SEARCH) from None


def _synth(run: RunFolder, folder: str) -> list[RunRow]:
    cfg = run.config
    if not run.has(REPORT):
        return [RunRow(folder, "synth", _text(cfg.get("model")), "fdda", status="in progress")]
    r = _dict(_json(run, REPORT), REPORT)
    try:
        images, acc = int(_number(r["images"], REPORT, optional=False) or 0), _number(r.get("fp_accuracy"), REPORT)
        note = f"{images} synthetic images" + ("" if acc is None else f", FP model {acc:g}% on them")
        return [RunRow(folder, "synth", _text(r.get("model", cfg.get("model"))), _text(r.get("method", "fdda")),
                       seconds=_number(r.get("seconds"), REPORT), note=note)]
    except (KeyError, TypeError, ValueError):
        raise _Corrupt(REPORT) from None


@functools.lru_cache(maxsize=16)
def _cost_template(model: str, weights: str | None, data_dir: str | None) -> tuple[list[Any], dict[str, Any]] | None:
    """Layer shapes and MACs of `model`, and the bits each layer takes when prepared at the probe width: one prepare
    and one forward pass of one test image, shared by every width of every QAT run of the model."""
    try:
        from metaaug.data import load_dataset
        from metaaug.models.registry import build_model
        from metaaug.quant.cost import layer_infos, model_bits
        from metaaug.quant.prepare import QuantSpec, prepare

        images = load_dataset(data_dir, "test").images[:2]
        qmodel = prepare(build_model(model, weights), QuantSpec(_PROBE_WBITS, _PROBE_ABITS), "layer", images)
        return layer_infos(qmodel, images[:1]), model_bits(qmodel)
    except Exception:  # a model or data folder not loadable here (moved, another machine): the cost stays unknown
        return None


def uniform_cost(model: str, weights: str | None, data_dir: str | None, wbits: int, abits: int) -> dict[str, Any] | None:
    """The cost model's figure for `model` at uniform WwbitsAabits (first and last layers at 8 bits, as `prepare` and
    QAT keep them), or None when the model cannot be built here. Layers at the probe bits are the ones the width sets;
    the probe bits differ from the 8 bits of the edges, so one prepared model serves every width."""
    from metaaug.quant.cost import policy_cost
    from metaaug.quant.policy import LayerBits

    template = _cost_template(model, None if weights is None else str(weights), None if data_dir is None else str(data_dir))
    if template is None:
        return None
    infos, probe = template
    bits = {name: LayerBits(wbits if b.wbits == _PROBE_WBITS else b.wbits, abits if b.abits == _PROBE_ABITS else b.abits)
            for name, b in probe.items()}
    return policy_cost(infos, bits)


def plottable(rows: Sequence[RunRow], axis: str) -> list[RunRow]:
    """The finished rows with a top-1 and a place on `axis` (memory or bops): synth runs and unknown costs drop out."""
    return [r for r in rows if r.finished and r.top1 is not None and r.x(axis) is not None]
