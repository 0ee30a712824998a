"""A QAT run folder: train from the FP checkpoint, evaluate every width, and rebuild any width for eval and export.

Files: config.json (refuses another config), the qat_progress checkpoint (resume), qat.safetensors (weights and
quantizer banks), bn_stats.safetensors (BatchNorm statistics per width), report.json and accuracy.png.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaaug.data import check_calibration, load_dataset, only_classes, stratified_indices
from metaaug.data.checks import check_model_fits_data
from metaaug.data.datasets import ImageDataset
from metaaug.environment import resolve_device
from metaaug.errors import ConfigError
from metaaug.evaluate import top1
from metaaug.models.registry import build_model
from metaaug.progress import PhaseProgress
from metaaug.qat.config import QATConfig
from metaaug.qat.switchable import QATModel, Width, width_name
from metaaug.qat.trainer import evaluate_widths, train_qat
from metaaug.quant.prepare import QuantModel, QuantSpec
from metaaug.quant.quantizers import check_bits
from metaaug.runs import files
from metaaug.runs.files import RESTART_HINT, CorruptFileError
from metaaug.runs.folder import RunFolder
from metaaug.runs.sources import absolutize
from metaaug.runs.store import REPORT

QAT_STATE, BN_STATS, PLOT = "qat.safetensors", "bn_stats.safetensors", "accuracy.png"
UNSEEN = (5, 6)  # W=A widths evaluated after training when no candidate has them (interpolated quantizers)


@dataclass(frozen=True)
class QATJob:
    """What a QAT run is: the model, its data, the seed and the recipe."""

    model: str = "resnet20"
    weights: str | None = None
    data_dir: str | None = None
    seed: int = 0
    qat: QATConfig = field(default_factory=QATConfig)

    def __post_init__(self) -> None:
        absolutize(self)

    def identity(self) -> dict[str, Any]:
        return {"kind": "qat", **dataclasses.asdict(self)}

    @classmethod
    def from_identity(cls, stored: dict[str, Any]) -> QATJob:
        try:
            qat = {k: tuple(v) if isinstance(v, list) else v for k, v in stored["qat"].items()}
            return cls(stored["model"], stored["weights"], stored["data_dir"], stored["seed"], QATConfig(**qat))
        except (KeyError, TypeError, AttributeError) as err:
            raise CorruptFileError(f"the run's config.json is not a QAT config ({type(err).__name__}: {err}); {RESTART_HINT}") from None


def job_data(job: QATJob) -> tuple[ImageDataset, torch.Tensor, ImageDataset]:
    """(train split, calibration images for quantizer init and BatchNorm re-estimation, test split), restricted to
    the job's classes when it names some."""
    train = only_classes(load_dataset(job.data_dir, "train"), job.qat.classes)
    test = only_classes(load_dataset(job.data_dir, "test"), job.qat.classes)
    calib = train.images[stratified_indices(train.labels, min(job.qat.calib_size, len(train)), job.seed)]
    check_calibration(calib)
    return train, calib, test


def build_qat_model(job: QATJob, calib: torch.Tensor, device: torch.device) -> QATModel:
    net = build_model(job.model, job.weights).to(device)
    cfg = job.qat
    return QATModel(net, cfg.wbits(), cfg.abits_list(), calib[:256].to(device), cfg.share_quantizers).to(device)


def _save_bn(model: QATModel, path: Path) -> None:
    files.save_tensors(path, {f"{w}/{k}": v for w, state in model.bn_stats.items() for k, v in state.items()})


def _load_bn(model: QATModel, path: Path) -> None:
    model.bn_stats = {}
    for key, v in files.load_tensors(path, "per-width BatchNorm statistics").items():
        width, _, name = key.partition("/")
        model.bn_stats.setdefault(width, {})[name] = v


def _plot(history: list[dict], path: Path, title: str) -> None:
    from metaaug.viz import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in history[0]["top1"]:
        ax.plot([h["epoch"] for h in history], [h["top1"][name] for h in history], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (eval slice, %)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, 90)


def run_qat(job: QATJob, out: str | Path, device: str = "auto", progress: PhaseProgress | None = None,
            command: str | None = None, on_step=None, restart: bool = False) -> dict[str, Any]:
    """Train per `job` into `out` (resuming what is there; `restart` starts over), evaluate each width on the test
    split, write the report."""
    out, dev, cfg = Path(out), resolve_device(device), job.qat
    RunFolder.check(out, "qat", job.identity(), restart=restart)
    train, calib, test = job_data(job)
    check_model_fits_data(build_model(job.model, job.weights), job.data_dir, train=train, test=test)  # before the folder is claimed
    run = RunFolder.claim(out, "qat", job.identity(), restart=restart)
    if run.has(REPORT) and run.has(QAT_STATE):
        return run.read_json(REPORT, "a QAT report")
    torch.manual_seed(job.seed)
    model = build_qat_model(job, calib, dev)
    fp_top1 = round(top1(model.eval(), test, device=dev), 2)
    eval_slice = test.subset(stratified_indices(test.labels, min(cfg.eval_size, len(test)), 0))
    start = time.perf_counter()
    state = train_qat(model, cfg, train, calib.to(dev), eval_slice, out, dev, progress, on_step)
    unseen = [(b, b) for b in UNSEEN if cfg.abits is None and b not in cfg.bits and min(cfg.bits) < b < max(cfg.bits)]
    final = evaluate_widths(model, [None, *cfg.widths(), *unseen], calib.to(dev), test, dev)
    model.use_width(None)
    files.save_tensors(out / QAT_STATE, model.state_dict())
    _save_bn(model, out / BN_STATS)
    _plot(state.history, out / PLOT, f"{job.model} {cfg.method} ({len(state.history)} epochs)")
    report = {
        "kind": "qat", "model": job.model, "method": cfg.method, "widths": [width_name(w) for w in cfg.widths()],
        "fp_top1_before": fp_top1, "top1": {k: v for k, v in final.items() if k in ("fp", *map(width_name, cfg.widths()))},
        "unseen_top1": {k: v for k, v in final.items() if k in map(width_name, unseen)},
        "test_images": len(test), "batchnorm": f"running statistics re-estimated per width on {len(calib)} train images",
        "steps": state.step, "train_seconds": round(state.seconds, 1), "seconds": round(time.perf_counter() - start, 1),
        "history": state.history, "config": dataclasses.asdict(cfg), "command": command, "plot": PLOT,
    }
    run.write_json(REPORT, report)
    return report


def open_qat_run(run_dir: str | Path, device: str = "auto") -> tuple[QATModel, QATJob, dict[str, Any], torch.Tensor, ImageDataset]:
    """Rebuild a finished QAT run's model (weights, quantizer banks, per-width BatchNorm statistics), with its report,
    calibration images and test split (loaded once for callers that need them)."""
    run = RunFolder.open(run_dir, ("qat",), "this command")
    state_path = run.require(QAT_STATE, "finished QAT run")
    run.require(REPORT, "finished QAT run")  # killed before the report: rerunning `metaaug qat` finishes it
    report = run.read_json(REPORT, "a QAT report")
    job = QATJob.from_identity(run.config)
    _, calib, test = job_data(job)
    dev = resolve_device(device)
    model = build_qat_model(job, calib, dev)
    state = files.load_tensors(state_path, "QAT weights", str(dev))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # a tensor of another shape: the weights of another run's model or widths
        missing, unexpected = ["(shapes differ)"], []
    if missing or unexpected:
        raise ConfigError(f"{state_path} does not match the run's model and widths ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected keys): copied from another run?")
    _load_bn(model, run.require(BN_STATS, "finished QAT run"))
    return model.eval(), job, report, calib.to(dev), test


def load_qat_run(run_dir: str | Path, device: str = "auto") -> tuple[QATModel, QATJob, dict[str, Any]]:
    """Rebuild a finished QAT run's model (weights, quantizer banks, per-width BatchNorm statistics)."""
    model, job, report, _, _ = open_qat_run(run_dir, device)
    return model, job, report


def parse_width(bits: str) -> Width:
    """'4' -> (4, 4); '2,4' or 'w2a4' -> (2, 4)."""
    text = bits.lower().replace("w", "").replace("a", ",")
    try:
        parts = [int(p) for p in text.split(",") if p]
    except ValueError:
        raise ConfigError(f"--bits {bits!r} is not an integer, 'W,A' or 'wWaA'") from None
    if len(parts) not in (1, 2):
        raise ConfigError(f"--bits {bits!r} is not an integer, 'W,A' or 'wWaA'")
    return (check_bits(parts[0], "--bits weight width"), check_bits(parts[-1], "--bits activation width"))


def eval_width(run_dir: str | Path, width: Width, device: str = "auto") -> dict[str, Any]:
    """Test top-1 of the run at `width` (BatchNorm statistics re-estimated when the run has none for it)."""
    model, job, report, calib, test = open_qat_run(run_dir, device)
    dev = next(model.parameters()).device
    qmodel = materialize(model, width, calib)
    acc = round(top1(qmodel, test, device=dev), 2)
    name = width_name(width)
    expected = report["top1"].get(name, report.get("unseen_top1", {}).get(name))
    return {"run": str(run_dir), "width": name, "trained": width in job.qat.widths(), "quant_top1": acc,
            "report_quant_top1": expected}


def materialize(model: QATModel, width: Width, calib: torch.Tensor) -> QuantModel:
    """The width as a prepared QuantModel (its BatchNorm statistics re-estimated first if the run has none)."""
    if width_name(width) not in model.bn_stats:
        model.recalibrate_bn(width, calib)
    return model.materialize(width)


def export_view(run_dir: str | Path, width: Width, device: str = "cpu") -> tuple[QuantModel, dict[str, Any]]:
    """A QAT run at one width: the model and what the packed file records of it (eval and the exporters)."""
    model, job, report, calib, _ = open_qat_run(run_dir, device)
    qmodel = materialize(model, width, calib)
    name = width_name(width)
    spec = QuantSpec(width[0], width[1], model.edge_bits, fold_bn=False)
    extra = {"quant_top1": report["top1"].get(name, report.get("unseen_top1", {}).get(name)),
             "fp_top1": report["top1"].get("fp"), "data_dir": job.data_dir, "wbits": width[0], "abits": width[1],
             "qat_method": job.qat.method, "classes": None if job.qat.classes is None else list(job.qat.classes)}
    return qmodel, {"model": job.model, "method": f"qat-{job.qat.method}", "spec": dataclasses.asdict(spec),
                    "units": "layer", "extra": extra, "weights": job.weights, "data_dir": job.data_dir}
