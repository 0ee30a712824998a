"""The QAT training loop: tasks per step (the method), their gradients, one optimiser step; saved and resumable.

A task is a bit-width on the step's batch. Every method also trains the FP forward (CE), whose logits are the
soft targets of the quantized tasks (self-distillation), except `dedicated`, which trains its one width with CE.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from metaaug.data.augment import augment
from metaaug.data.datasets import ImageDataset
from metaaug.evaluate import accuracy, logits_of
from metaaug.progress import PhaseProgress, QuietPhases
from metaaug.qat.config import QATConfig
from metaaug.qat.switchable import QATModel, Width, width_name
from metaaug.runs.folder import Checkpoints

CHECKPOINT = "qat_progress"


def sample_tasks(cfg: QATConfig, gen: torch.Generator) -> list[Width]:
    """The step's quantized widths: MEBQAT samples `tasks` of them, the lowest and highest always among them."""
    widths = cfg.widths()
    if cfg.method in ("joint", "dedicated") or len(widths) <= cfg.tasks:
        return widths
    forced = [widths[0], widths[-1]][: cfg.tasks]
    rest = widths[1:-1]
    picks = torch.randperm(len(rest), generator=gen)[: cfg.tasks - len(forced)].tolist()
    return forced + [rest[i] for i in sorted(picks)]


def task_loss(model: QATModel, width: Width | None, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None,
              distill: float) -> torch.Tensor:
    """CE at `width`, plus `distill` x soft CE to the FP logits when there is a teacher."""
    model.set_width(width)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    if teacher is not None and distill > 0:
        loss = loss + distill * -(teacher.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    return loss


def _fp_task(model: QATModel, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Backward the FP task's CE (scaled) and return its detached logits, the teacher of the quantized tasks."""
    model.set_width(None)
    logits = model(x)
    (scale * F.cross_entropy(logits, y)).backward()
    return logits.detach()


def averaged_step(model: QATModel, cfg: QATConfig, x: torch.Tensor, y: torch.Tensor, tasks: list[Width]) -> float:
    """MEBQAT (released code) / joint / dedicated: the tasks' gradients on one batch, averaged (accumulated)."""
    if cfg.method == "dedicated":
        loss = task_loss(model, tasks[0], x, y, None, 0.0)
        loss.backward()
        return loss.item()
    n = len(tasks) + 1
    teacher = _fp_task(model, x, y, 1 / n)
    total = 0.0
    for width in tasks:
        loss = task_loss(model, width, x, y, teacher, cfg.distill)
        (loss / n).backward()
        total += loss.item()
    return total / len(tasks)


def fomaml_step(model: QATModel, cfg: QATConfig, x: torch.Tensor, y: torch.Tensor, tasks: list[Width]) -> float:
    """First-order MAML over bit-width tasks: per task, `inner_steps` SGD steps on the support half at its width,
    then the query half's gradient at the adapted weights is added to the shared weights' gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    half = len(x) // 2
    (xs, ys), (xq, yq) = (x[:half], y[:half]), (x[half:], y[half:])
    n = len(tasks) + 1
    teacher = _fp_task(model, xq, yq, 1 / n)
    start = [p.detach().clone() for p in params]
    outer = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    total = 0.0
    with torch.no_grad():
        model.set_width(None)
        support_teacher = model(xs)
    for width in tasks:
        for _ in range(cfg.inner_steps):
            loss = task_loss(model, width, xs, ys, support_teacher, cfg.distill)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.sub_(cfg.inner_lr * g.clamp(-cfg.grad_clamp, cfg.grad_clamp))
        loss = task_loss(model, width, xq, yq, teacher, cfg.distill)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for acc, g in zip(outer, grads, strict=True):
                if g is not None:
                    acc.add_(g / n)
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        total += loss.item()
    for p, g in zip(params, outer, strict=True):
        p.grad = g
    return total / len(tasks)


STEPS: dict[str, Callable[[QATModel, QATConfig, torch.Tensor, torch.Tensor, list[Width]], float]] = {
    "mebqat": averaged_step, "joint": averaged_step, "dedicated": averaged_step, "mebqat-maml": fomaml_step}


@torch.no_grad()
def evaluate_widths(model: QATModel, widths: list[Width | None], calib: torch.Tensor, test: ImageDataset,
                    device: torch.device) -> dict[str, float]:
    """Top-1 per width with BatchNorm statistics re-estimated at that width from the calibration images; the
    training statistics are restored afterwards."""
    kept, was = model.bn_state(), model.training
    out = {}
    for width in widths:
        model.recalibrate_bn(width, calib)
        model.eval()
        out[width_name(width)] = round(accuracy(logits_of(model, test.images, device=device), test.labels), 2)
    model.qnet.load_state_dict(kept, strict=False)
    model.train(was)
    return out


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def total_steps(cfg: QATConfig, n_train: int) -> tuple[int, int]:
    """(optimiser steps in all, steps per epoch); `steps` caps the epochs' count."""
    per_epoch = max(1, n_train // cfg.batch)
    return (min(cfg.steps, cfg.epochs * per_epoch) if cfg.steps else cfg.epochs * per_epoch), per_epoch


def make_optimizer(model: QATModel, cfg: QATConfig, steps: int):
    qparams = {id(p) for p in model.quantizer_parameters()}
    weights = [p for p in model.parameters() if id(p) not in qparams]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": cfg.weight_decay},
                             {"params": model.quantizer_parameters(), "weight_decay": 0.0, "lr": cfg.quant_lr}], lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def train_qat(model: QATModel, cfg: QATConfig, train: ImageDataset, calib: torch.Tensor, test: ImageDataset,
              out: Path, device: torch.device, progress: PhaseProgress | None = None,
              on_step: Callable[[int], None] | None = None) -> TrainState:
    """Train `model` per `cfg`; saves the `qat_progress` checkpoint in `out` every `save_every` steps and each epoch, and a
    rerun continues from there, ending exactly where an uninterrupted run would. Evaluates every width at
    each epoch's end on `test` (a held slice of the test split) for the curve."""
    progress = progress or QuietPhases()
    steps, per_epoch = total_steps(cfg, len(train))
    opt, sched = make_optimizer(model, cfg, steps)
    state, perm = TrainState(), None
    gen = torch.Generator().manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints, stateful = Checkpoints(out), {"opt": opt, "sched": sched}
    saved = checkpoints.load_training(CHECKPOINT, model, stateful, str(device), "this QAT run")
    if saved is not None:
        info, extra = saved
        torch.set_rng_state(extra["rng"])
        gen.set_state(extra["gen"])
        perm = extra["perm"]
        state = TrainState(int(info["step"]), float(info["seconds"]), info["history"])

    def save() -> None:
        checkpoints.save_training(CHECKPOINT, {"step": state.step, "seconds": state.seconds, "history": state.history}, model,
                                  stateful, {"rng": torch.get_rng_state(), "gen": gen.get_state(), "perm": perm})

    eval_widths: list[Width | None] = [None, *cfg.widths()]
    step_fn = STEPS[cfg.method]
    n_epochs = math.ceil(steps / per_epoch)
    model.train()
    while state.step < steps:
        epoch, i = divmod(state.step, per_epoch)
        if i == 0:
            perm = torch.randperm(len(train))
        progress.phase(f"epoch {epoch + 1}/{n_epochs}", min(per_epoch, steps - epoch * per_epoch))
        progress.advance(i, "resumed" if i else "")
        t0 = time.perf_counter()
        while i < per_epoch and state.step < steps:
            idx = perm[i * cfg.batch : (i + 1) * cfg.batch]
            x, y = augment(train.images[idx]).to(device), train.labels[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = step_fn(model, cfg, x, y, sample_tasks(cfg, gen))
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-cfg.grad_clamp, cfg.grad_clamp)
            opt.step()
            sched.step()
            state.step, i = state.step + 1, i + 1
            progress.advance(1, f"loss {loss:.3f}")
            if on_step is not None:
                on_step(state.step)
            if state.step % cfg.save_every == 0 and i < per_epoch and state.step < steps:
                state.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save()
        state.seconds += time.perf_counter() - t0
        accs = evaluate_widths(model, eval_widths, calib, test, device)
        state.history.append({"epoch": epoch + 1, "step": state.step, "seconds": round(state.seconds, 1), "top1": accs})
        progress.advance(0, "  ".join(f"{k} {v:.2f}" for k, v in accs.items()))
        perm = None
        save()
    return state
