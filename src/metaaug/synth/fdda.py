"""FDDA: train a class-conditional generator against the frozen FP model's BN statistics, then save its images.

Zhong et al., "Fine-grained Data Distribution Alignment for Post-Training Quantization", ECCV 2022.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from metaaug.config_check import SEED, Ranges, check_config, coerce_options
from metaaug.data.calib import stratified_indices
from metaaug.data.datasets import FASHION_MNIST_INFO, DataInfo, ImageDataset
from metaaug.environment import environment
from metaaug.errors import ConfigError, DataError
from metaaug.evaluate import logits_of
from metaaug.runs import files
from metaaug.synth.bns import BNStats, ClassCentres, bn_layers, class_bns_loss, class_centres, deep_half, global_bns_loss
from metaaug.synth.data import IMAGES_FILE
from metaaug.synth.generator import Generator

FMNIST_RANGE = FASHION_MNIST_INFO.value_range()


@dataclass
class FDDAConfig:
    """Every knob of FDDA synthesis (Zhong et al., ECCV 2022, "Fine-grained Data Distribution Alignment for PTQ").

    Loss = w_ce * CE(f(G(z, y)), y) + w_global * global BNS + w_distorted * BNS-distorted + w_centralised * BNS-centralised;
    the two class losses use the deepest `class_layer_fraction` of the BN layers and are off when `real_per_class`
    is 0 (pure BNS inversion, data-free). Defaults follow the paper (centralised weight: paper range 0.01-0.05).
    """

    RANGES: ClassVar[Ranges] = {
        "per_class": ">= 1", "steps": ">= 1", "real_per_class": ">= 0", "batch_size": ">= 1", "latent_dim": ">= 1",
        "channels": ">= 1", "lr": "> 0", "w_ce": ">= 0", "w_global": ">= 0", "w_distorted": ">= 0", "w_centralised": ">= 0",
        "noise_std_mean": ">= 0", "noise_std_var": ">= 0", "class_layer_fraction": "(0, 1]", "image_shape": ">= 1",
        "seed": SEED,
    }

    per_class: int = 100
    steps: int = 1000
    real_per_class: int = 1
    batch_size: int = 100
    latent_dim: int = 100
    channels: int = 32
    lr: float = 1e-3
    w_ce: float = 1.0
    w_global: float = 0.2
    w_distorted: float = 0.9
    w_centralised: float = 0.02
    noise_std_mean: float = 0.5
    noise_std_var: float = 1.0
    class_layer_fraction: float = 0.5
    image_shape: tuple[int, int, int] | None = None  # None: from the data's descriptor (Fashion-MNIST: 1x28x28)
    value_range: tuple[float, float] | None = None  # None: the range the data's normalisation maps [0, 1] pixels to
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> FDDAConfig:
        """Every field against its type and range (again at synthesis: a config can be changed after it is made)."""
        check_config(self)
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ConfigError(f"value_range must be [low, high] with low < high, got {list(self.value_range)}")
        return self

    @classmethod
    def from_options(cls, **options: Any) -> FDDAConfig:
        """Build from keyword overrides (e.g. the CLI's `--set key=value` strings, coerced by field type), naming
        any unknown key."""
        return cls(**coerce_options(cls, options, "FDDA"))

    def geometry(self, info: DataInfo | None) -> tuple[tuple[int, int, int], tuple[float, float]]:
        """Image shape and value range: set explicitly, else from the data's descriptor, else Fashion-MNIST's."""
        info = info or FASHION_MNIST_INFO
        return self.image_shape or info.shape, self.value_range or info.value_range()


@dataclass
class SynthResult:
    """Generated images `(N, C, H, W)` on the CPU, their labels, class names and the run report."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    report: dict[str, Any]


def balanced_labels(num_classes: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_classes, device=device).repeat(math.ceil(n / num_classes))[:n]


class FDDALoss:
    """The FDDA objective on one generated batch; keeps the BN hooks and class centres."""

    def __init__(self, model: nn.Module, cfg: FDDAConfig, centres: ClassCentres | None, noise: torch.Generator) -> None:
        self.model, self.cfg, self.centres, self.noise = model, cfg, centres, noise
        self.stats = BNStats(model)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        with self.stats:
            logits = self.model(images)
        moments = self.stats.collected()
        terms = {"ce": nn.functional.cross_entropy(logits, labels), "global": global_bns_loss(moments, self.stats.layers)}
        total = cfg.w_ce * terms["ce"] + cfg.w_global * terms["global"]
        if self.centres is not None:
            terms["distorted"] = class_bns_loss(moments, labels, self.centres, (cfg.noise_std_mean, cfg.noise_std_var), self.noise)
            terms["centralised"] = class_bns_loss(moments, labels, self.centres)
            total = total + cfg.w_distorted * terms["distorted"] + cfg.w_centralised * terms["centralised"]
        return total, {"total": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def _num_classes(model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> int:
    with torch.no_grad():
        out = model(torch.zeros(2, *shape, device=device))
    if out.dim() != 2:
        raise DataError(f"the model returns {tuple(out.shape)} for images {shape}; FDDA needs class logits (N, K)")
    return int(out.shape[1])


def synthesize(model: nn.Module, cfg: FDDAConfig, real: ImageDataset | None = None, device: torch.device | str = "cpu",
               console: Console | None = None, info: DataInfo | None = None) -> SynthResult:
    """Train G against the frozen FP `model` (with its BN layers, unfolded) and generate `per_class` images per class.

    `real` supplies the training images the class centres are measured on (`real_per_class` per class, stratified,
    seeded); it is not needed when `real_per_class` is 0. `info` (or `real`'s) gives the image shape and range.
    The model is put in eval mode and frozen.
    """
    cfg.check()
    start = time.perf_counter()
    dev = torch.device(device)
    layers = bn_layers(model)
    model.eval().to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    shape, value_range = cfg.geometry(info or (real.info if real is not None else None))
    num_classes = _num_classes(model, shape, dev)
    classes = [str(i) for i in range(num_classes)]

    centres, real_idx, reference = None, [], None
    if cfg.real_per_class > 0:
        if real is None:
            raise DataError("FDDA class centres need real training images (or use real_per_class=0 for data-free)")
        if len(real.classes) != num_classes:
            raise DataError(f"the data has {len(real.classes)} classes but the model outputs {num_classes}")
        classes = list(real.classes)
        idx = stratified_indices(real.labels, cfg.real_per_class * num_classes, cfg.seed)
        real_idx = sorted(idx.tolist())
        centres = class_centres(model, real.images[idx], real.labels[idx], num_classes,
                                deep_half(len(layers), cfg.class_layer_fraction))
        ref_idx = stratified_indices(real.labels, min(cfg.batch_size, len(real)), cfg.seed + 1)
        with torch.no_grad(), BNStats(model) as rec:
            model(real.images[ref_idx].to(dev))
            reference = float(global_bns_loss(rec.collected(), layers))

    torch.manual_seed(cfg.seed)
    gen = Generator(num_classes, cfg.latent_dim, cfg.channels, shape, value_range).to(dev).train()
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    loss_fn = FDDALoss(model, cfg, centres, torch.Generator().manual_seed(cfg.seed + 2))
    y_eval = balanced_labels(num_classes, cfg.batch_size, dev)
    z_eval = torch.randn(cfg.batch_size, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 3)).to(dev)

    def bns_distance() -> dict[str, float]:
        with torch.no_grad(), loss_fn.stats:
            model(gen(z_eval, y_eval))
            moments = loss_fn.stats.collected()
            out = {"global": float(global_bns_loss(moments, layers))}
            if centres is not None:
                out["centralised"] = float(class_bns_loss(moments, y_eval, centres))
        return out

    before = bns_distance()
    history: list[dict[str, float]] = []
    every = max(1, cfg.steps // 50)
    bar = Progress(TextColumn("[bold]FDDA generator"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=console is None)
    with bar:
        task = bar.add_task("fdda", total=max(cfg.steps, 1), info="")
        for step in range(cfg.steps):
            z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=rng).to(dev)
            total, parts = loss_fn(gen(z, y_eval), y_eval)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if step % every == 0 or step == cfg.steps - 1:
                history.append({"step": step, **{k: round(v, 5) for k, v in parts.items()}})
                bar.update(task, info=f"loss {parts['total']:.3f}  ce {parts['ce']:.3f}  bns {parts['global']:.3f}")
            bar.advance(task)
    after = bns_distance()

    images, labels = generate(gen, num_classes, cfg, dev)
    pred = logits_of(model, images, 500, dev).argmax(1)
    correct = (pred == labels).float()
    report = {
        "method": "fdda", "classes": classes, "images": len(labels), "per_class": cfg.per_class,
        "real_per_class": cfg.real_per_class, "data_free": centres is None, "real_indices": real_idx,
        "fp_accuracy": round(100 * float(correct.mean()), 2),
        "fp_accuracy_per_class": {c: round(100 * float(correct[labels == k].mean()), 2) for k, c in enumerate(classes)},
        "bns_distance": {"before": before, "after": after, **({"real_reference": reference} if reference is not None else {})},
        "bn_layers": len(layers), "class_loss_layers": [layers[i][0] for i in centres.layer_ids] if centres else [],
        "loss_history": history,
        "seconds": round(time.perf_counter() - start, 1), **environment(dev),
        "config": {**dataclasses.asdict(cfg), "image_shape": list(shape), "value_range": list(value_range)},
    }
    return SynthResult(images, labels, classes, report)


@torch.no_grad()
def generate(gen: Generator, num_classes: int, cfg: FDDAConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` images per class, made in full class-balanced batches (the batch composition G was trained on)."""
    z_rng = torch.Generator().manual_seed(cfg.seed + 4)
    need = cfg.per_class * num_classes
    y = balanced_labels(num_classes, cfg.batch_size, device)
    images, labels = [], []
    for _ in range(math.ceil(need / cfg.batch_size) + 1):
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=z_rng).to(device)
        images.append(gen(z, y).float().cpu())
        labels.append(y.cpu())
    images_all, labels_all = torch.cat(images), torch.cat(labels)
    keep = torch.cat([torch.nonzero(labels_all == k).flatten()[:cfg.per_class] for k in range(num_classes)])
    return images_all[keep].contiguous(), labels_all[keep].contiguous()


def save_synth(result: SynthResult, out: str | Path, title: str = "FDDA synthetic images") -> Path:
    """Write `images.safetensors`, one PNG grid per class (`class_<k>.png`) and `report.json` into `out`."""
    from metaaug.viz import image_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files.save_tensors(out / IMAGES_FILE, {"images": result.images.float(), "labels": result.labels.long()},
                       metadata={"classes": json.dumps(result.classes), "format": "metaaug-synth-1"})
    pngs = []
    for k, name in enumerate(result.classes):
        imgs = result.images[result.labels == k][:30]
        rows = [(f"class {name}" if i == 0 else "", imgs[i:i + 10]) for i in range(0, len(imgs), 10)]
        if rows:
            pngs.append(image_grid(rows, out / f"class_{k}.png", f"{title}: class {name}").name)
    report = {**result.report, "files": [IMAGES_FILE, *pngs, "report.json"]}
    files.write_json(out / "report.json", report)
    return out
