"""A QAT run folder: train from the FP checkpoint, evaluate every width, and rebuild any width for eval and export.

Files: config.json (refuses another config), qat_progress.pt (resume), qat.safetensors (weights and quantizer
banks), bn_stats.safetensors (BatchNorm statistics per width), report.json and accuracy.png.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metaaug.data import check_calibration, load_dataset, only_classes, stratified_indices
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
from metaaug.store import REPORT, RunStore, read_json

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

    def identity(self) -> dict[str, Any]:
        return {"kind": "qat", **dataclasses.asdict(self)}

    @classmethod
    def from_identity(cls, stored: dict[str, Any]) -> QATJob:
        qat = {k: tuple(v) if isinstance(v, list) else v for k, v in stored["qat"].items()}
        return cls(stored["model"], stored["weights"], stored["data_dir"], stored["seed"], QATConfig(**qat))


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
    flat = {f"{w}/{k}": v.cpu().contiguous() for w, state in model.bn_stats.items() for k, v in state.items()}
    save_file(flat, str(path))


def _load_bn(model: QATModel, path: Path) -> None:
    model.bn_stats = {}
    for key, v in load_file(str(path)).items():
        width, _, name = key.partition("/")
        model.bn_stats.setdefault(width, {})[name] = v


def _plot(history: list[dict], path: Path, title: str) -> None:
    from metaaug.viz import plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in history[0]["top1"]:
        ax.plot([h["epoch"] for h in history], [h["top1"][name] for h in history], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (eval slice, %)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_qat(job: QATJob, out: str | Path, device: str = "auto", progress: PhaseProgress | None = None,
            command: str | None = None, on_step=None) -> dict[str, Any]:
    """Train per `job` into `out` (resuming what is there), evaluate each width on the test split, write the report."""
    out, dev, cfg = Path(out), resolve_device(device), job.qat
    train, calib, test = job_data(job)
    RunStore(out, job.identity())  # refuses a folder holding another config
    if (out / REPORT).exists() and (out / QAT_STATE).exists():
        return read_json(out / REPORT)
    torch.manual_seed(job.seed)
    model = build_qat_model(job, calib, dev)
    fp_top1 = round(top1(model.eval(), test, device=dev), 2)
    eval_slice = test.subset(stratified_indices(test.labels, min(cfg.eval_size, len(test)), 0))
    start = time.perf_counter()
    state = train_qat(model, cfg, train, calib.to(dev), eval_slice, out, dev, progress, on_step)
    unseen = [(b, b) for b in UNSEEN if cfg.abits is None and b not in cfg.bits and min(cfg.bits) < b < max(cfg.bits)]
    final = evaluate_widths(model, [None, *cfg.widths(), *unseen], calib.to(dev), test, dev)
    model.use_width(None)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / QAT_STATE))
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
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def open_qat_run(run_dir: str | Path, device: str = "auto") -> tuple[QATModel, QATJob, dict[str, Any], torch.Tensor, ImageDataset]:
    """Rebuild a finished QAT run's model (weights, quantizer banks, per-width BatchNorm statistics), with its report,
    calibration images and test split (loaded once for callers that need them)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a run folder (config.json missing)")
    stored = read_json(run_dir / "config.json")
    if stored.get("kind") != "qat":
        raise ConfigError(f"{run_dir} is not a QAT run (written by `metaaug quantize`, not `metaaug qat`)")
    if not (run_dir / QAT_STATE).exists():
        raise ConfigError(f"{run_dir} holds no finished QAT run ({QAT_STATE} missing); rerun `metaaug qat` to resume it")
    job = QATJob.from_identity(stored)
    _, calib, test = job_data(job)
    dev = resolve_device(device)
    model = build_qat_model(job, calib, dev)
    model.load_state_dict(load_file(str(run_dir / QAT_STATE), device=str(dev)))
    _load_bn(model, run_dir / BN_STATS)
    return model.eval(), job, read_json(run_dir / REPORT), calib.to(dev), test


def load_qat_run(run_dir: str | Path, device: str = "auto") -> tuple[QATModel, QATJob, dict[str, Any]]:
    """Rebuild a finished QAT run's model (weights, quantizer banks, per-width BatchNorm statistics)."""
    model, job, report, _, _ = open_qat_run(run_dir, device)
    return model, job, report


def is_qat_run(run_dir: str | Path) -> bool:
    path = Path(run_dir) / "config.json"
    return path.exists() and read_json(path).get("kind") == "qat"


def parse_width(bits: str) -> Width:
    """'4' -> (4, 4); '2,4' or 'w2a4' -> (2, 4)."""
    text = bits.lower().replace("w", "").replace("a", ",")
    try:
        parts = [int(p) for p in text.split(",") if p]
    except ValueError:
        raise ConfigError(f"bit-width {bits!r} is not an integer, 'W,A' or 'wWaA'") from None
    if len(parts) not in (1, 2):
        raise ConfigError(f"bit-width {bits!r} is not an integer, 'W,A' or 'wWaA'")
    return (parts[0], parts[-1])


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


def export_view(run_dir: str | Path, width: Width) -> tuple[QuantModel, dict[str, Any]]:
    """What the exporters need from a QAT run at one width: the model and the packed file's metadata."""
    model, job, report, calib, _ = open_qat_run(run_dir, "cpu")
    qmodel = materialize(model, width, calib)
    name = width_name(width)
    spec = QuantSpec(width[0], width[1], model.edge_bits, fold_bn=False)
    extra = {"quant_top1": report["top1"].get(name, report.get("unseen_top1", {}).get(name)),
             "fp_top1": report["top1"].get("fp"), "data_dir": job.data_dir, "wbits": width[0], "abits": width[1],
             "qat_method": job.qat.method}
    return qmodel, {"model": job.model, "method": f"qat-{job.qat.method}", "spec": dataclasses.asdict(spec),
                    "units": "layer", "extra": extra, "weights": job.weights, "data_dir": job.data_dir}
