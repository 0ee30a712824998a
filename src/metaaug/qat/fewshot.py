"""Few-shot evaluation of a QAT run meta-trained on seen classes: N-way K-shot episodes on the unseen classes at
each bit-width, with a metric head (prototypes) and an optimisation head (Proto-MAML: a linear head started at
the prototypes, then first-order SGD steps on the support set; the backbone stays as trained).

Features are the input of the model's last layer (as the deployed quantized model computes it), extracted once
per width; episodes come from the test split of the unseen classes only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from metaaug.config_check import SEED, Ranges, check_config
from metaaug.data import load_dataset
from metaaug.errors import ConfigError
from metaaug.qat.job import materialize, open_qat_run
from metaaug.qat.switchable import width_name
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import check_bits
from metaaug.runs import files
from metaaug.runs.opened import open_run
from metaaug.runs.outputs import check_output_file, json_marked

HEADS = ("proto", "maml")
FEWSHOT_MARK = "metaaug fewshot"


@dataclass(frozen=True)
class EpisodeConfig:
    """Episodes as in the few-shot variant of MEBQAT (Youn et al., ECCV 2022): inner SGD lr 0.01, 5 steps."""

    ways: int = 4
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    episodes: int = 600
    heads: tuple[str, ...] = HEADS
    inner_lr: float = 0.01
    inner_steps: int = 5
    seed: int = 0
    RANGES: ClassVar[Ranges] = {"ways": ">= 2", "shots": ">= 1", "queries": ">= 1", "episodes": ">= 1", "heads": HEADS,
                                "inner_lr": "> 0", "inner_steps": ">= 0", "seed": SEED}

    def __post_init__(self) -> None:
        check_config(self)
        if not self.shots or not self.heads:
            raise ConfigError(f"few-shot episodes need at least one K (--shots) and one head (--heads), got {self.shots} and {self.heads}")


def sample_episode(by_class: dict[int, torch.Tensor], ways: int, shots: int, queries: int,
                   gen: torch.Generator) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(episode classes, support indices (ways*shots, class-major), query indices) drawn from `by_class` only."""
    classes = sorted(by_class)
    if ways > len(classes):
        raise ConfigError(f"{ways}-way episodes need {ways} classes; only {len(classes)} are unseen")
    picked = [classes[i] for i in torch.randperm(len(classes), generator=gen)[:ways].tolist()]
    support, query = [], []
    for c in picked:
        idx = by_class[c]
        if len(idx) < shots + queries:
            raise ConfigError(f"class {c} has {len(idx)} images; an episode needs {shots + queries}")
        perm = idx[torch.randperm(len(idx), generator=gen)[: shots + queries]]
        support.append(perm[:shots])
        query.append(perm[shots:])
    return picked, torch.cat(support), torch.cat(query)


@torch.no_grad()
def features(qmodel: QuantModel, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The input of the model's last layer for every image."""
    last = [ql for ql in qmodel.quant_layers() if ql.edge == "last"]
    if len(last) != 1:
        raise ConfigError(f"few-shot features need exactly one last layer; the model has {len(last)}")
    got: list[torch.Tensor] = []
    handle = last[0].register_forward_pre_hook(lambda _m, args: got.append(args[0].flatten(1).float().cpu()))
    dev = next(qmodel.parameters()).device
    for i in range(0, len(images), batch):
        qmodel(images[i : i + batch].to(dev))
    handle.remove()
    return torch.cat(got)


def _proto_logits(support: torch.Tensor, ways: int, shots: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    protos = support.view(ways, shots, -1).mean(1)
    return -torch.cdist(query, protos) ** 2, protos


def episode_accuracy(feats: torch.Tensor, support: torch.Tensor, query: torch.Tensor, ways: int, shots: int,
                     head: str, cfg: EpisodeConfig) -> float:
    s, q = feats[support], feats[query]
    yq = torch.arange(ways).repeat_interleave(len(query) // ways)
    logits, protos = _proto_logits(s, ways, shots, q)
    if head == "maml":
        # Proto-MAML: the linear head equal to the squared-distance classifier, adapted by SGD on the support set
        w = (2 * protos).clone().requires_grad_(True)
        b = (-(protos**2).sum(1)).clone().requires_grad_(True)
        ys = torch.arange(ways).repeat_interleave(shots)
        with torch.enable_grad():
            for _ in range(cfg.inner_steps):
                loss = F.cross_entropy(s @ w.T + b, ys)
                gw, gb = torch.autograd.grad(loss, (w, b))
                w, b = (w - cfg.inner_lr * gw).detach().requires_grad_(True), (b - cfg.inner_lr * gb).detach().requires_grad_(True)
        logits = q @ w.T + b
    return 100.0 * float((logits.argmax(1) == yq).float().mean())


def run_fewshot(run_dir: str | Path, widths: list[int | None], cfg: EpisodeConfig, out: str | Path | None = None,
                force: bool = False) -> dict[str, Any]:
    """Episodes per (width, K, head) on the unseen classes' test images; mean accuracy with a 95% interval.
    `out` (default `<run>/fewshot.json`) never replaces a file fewshot did not write, unless `force`."""
    opened = open_run(run_dir, "fewshot", ("qat",))
    path = check_output_file(Path(out) if out else opened.folder.file("fewshot.json"), "--out", FEWSHOT_MARK,
                             json_marked(FEWSHOT_MARK), force, own_run=opened.folder, own_names=("fewshot.json",))
    for bits in widths:
        if bits is not None:
            check_bits(bits, "--bits width")
    model, job, _, calib, _ = open_qat_run(run_dir, "cpu")
    seen = job.qat.classes
    if seen is None:
        raise ConfigError(f"{run_dir} was trained on every class; meta-train on seen classes first (`metaaug qat --classes 0,1,2,3,4,5`)")
    test = load_dataset(job.data_dir, "test")
    unseen = sorted(set(range(max(int(test.labels.max()) + 1, len(test.classes)))) - set(seen))
    if len(unseen) < cfg.ways:
        raise ConfigError(f"{run_dir} was trained on {len(seen)} classes, leaving {len(unseen)} unseen; {cfg.ways}-way episodes "
                          f"need {cfg.ways} (train on fewer classes, or lower --ways)")
    keep = torch.nonzero(torch.isin(test.labels, torch.tensor(unseen))).flatten()
    images, labels = test.images[keep], test.labels[keep]
    by_class = {c: torch.nonzero(labels == c).flatten() for c in unseen}
    results = []
    for bits in widths:
        width = None if bits is None else (bits, bits)
        if width is None:
            model.use_width(None, calib)
            feats = features(_fp_view(model), images)
        else:
            feats = features(materialize(model, width, calib), images)
        for shots in cfg.shots:
            for head in cfg.heads:
                gen = torch.Generator().manual_seed(cfg.seed)  # the same episodes for every width and head
                accs = torch.tensor([episode_accuracy(feats, *sample_episode(by_class, cfg.ways, shots, cfg.queries, gen)[1:],
                                                      cfg.ways, shots, head, cfg) for _ in range(cfg.episodes)])
                ci = 1.96 * float(accs.std()) / math.sqrt(len(accs)) if len(accs) > 1 else float("nan")
                results.append({"width": width_name(width), "head": head, "shots": shots, "mean": round(float(accs.mean()), 2),
                                "ci95": round(ci, 2), "episodes": len(accs)})
    report = {"seen_classes": list(seen), "unseen_classes": unseen, "config": asdict(cfg), "results": results, "path": str(path),
              "written_by": FEWSHOT_MARK}
    files.write_json(path, report)
    return report


def _fp_view(model) -> QuantModel:
    """The QAT model's FP forward as a QuantModel with quantization off (same graph, so the same feature hook)."""
    model.set_width(None)
    return model.qnet
