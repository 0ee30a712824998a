"""The reconstruction engine: for each unit, cache its inputs/outputs, then learn rounding and steps.

Every method is this loop with different settings; MetaAug subclasses it to add a meta phase and extra
(transformed) training inputs per unit via `extra_data`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from metaaug.data.augment import augment
from metaaug.environment import loop_threads, threads
from metaaug.progress import NullProgress, Progress, UnitStats
from metaaug.quant.grids import check_compiler, compiled_fake_quant, qdrop_mix
from metaaug.quant.observe import observing
from metaaug.quant.prepare import QuantModel
from metaaug.recon.cache import Cache, CacheSettings, is_rows, take_rows
from metaaug.recon.config import ReconConfig
from metaaug.recon.estimate import JobEstimate, estimate
from metaaug.recon.loss import beta_at, output_error, rounding_penalty
from metaaug.recon.stepper import GraphStepper, map_chunks

OBSERVE_IMAGES = 256


@dataclass
class UnitData:
    """A unit's cached inputs on the quantized path and the FP path, and its FP outputs (on the cache device)."""

    q_in: tuple
    fp_in: tuple
    fp_out: torch.Tensor | tuple

    @property
    def size(self) -> int:
        return next(a for a in self.q_in if is_rows(a)).shape[0]

    def cat(self, other: UnitData) -> UnitData:
        def join(a, b):
            if is_rows(a):
                return torch.cat([a[:], b[:]])  # stored rows read back whole
            if isinstance(a, tuple):
                return tuple(join(x, y) for x, y in zip(a, b, strict=True))
            return a
        return UnitData(join(self.q_in, other.q_in), join(self.fp_in, other.fp_in), join(self.fp_out, other.fp_out))

    def batch(self, idx: torch.Tensor, quant_prob: float, device: torch.device) -> tuple[list, torch.Tensor | tuple]:
        """Inputs for a batch: QDrop mixes quantized and FP inputs element-wise with probability `quant_prob`."""
        inputs = []
        for q, f in zip(self.q_in, self.fp_in, strict=True):
            if not is_rows(q):
                inputs.append(q)
                continue
            qb = take_rows(q, idx).to(device, non_blocking=True)
            if quant_prob < 1.0:
                qb = qdrop_mix(qb, take_rows(f, idx).to(device, non_blocking=True), quant_prob)
            inputs.append(qb)
        out = self.fp_out
        target = take_rows(out, idx).to(device) if is_rows(out) else tuple(
            take_rows(o, idx).to(device) if is_rows(o) else o for o in out)  # shapes passed between units stay as they are
        return inputs, target


@contextlib.contextmanager
def compute_context(device: torch.device, cfg: ReconConfig) -> Iterator[None]:
    """A reconstruction step's forward as `cfg` asks: bf16 autocast (`compute_dtype`), compiled fake-quant
    (`compile_fake_quant`); the defaults add nothing."""
    with contextlib.ExitStack() as stack:
        if cfg.compute_dtype != "float32":
            stack.enter_context(torch.autocast(device.type, dtype=getattr(torch, cfg.compute_dtype)))
        stack.enter_context(compiled_fake_quant(cfg.compile_fake_quant))
        yield


def scale_scheduler(opt: torch.optim.Optimizer, cfg: ReconConfig) -> torch.optim.lr_scheduler.LambdaLR | None:
    """With `scale_schedule="cosine"`, per-group factors: the steps cosine-annealed, the rounding logits constant.
    None for the constant schedule, so the default loop pays nothing per step."""
    if cfg.scale_schedule != "cosine":
        return None

    def cosine(it: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(it, cfg.iters) / max(cfg.iters, 1)))

    return torch.optim.lr_scheduler.LambdaLR(
        opt, [cosine if g.get("name") != "round" else (lambda it: 1.0) for g in opt.param_groups])


@contextlib.contextmanager
def fp_mode(qmodel: QuantModel) -> Iterator[None]:
    """Temporarily switch every quantizer off (the exact FP model, BN folded), restoring the flags after."""
    layers, acts = list(qmodel.quant_layers()), list(qmodel.act_quantizers())
    saved = [layer.quantize_weight for layer in layers], [aq.enabled for aq in acts]
    qmodel.set_quant(False, False)
    try:
        yield
    finally:
        for layer, flag in zip(layers, saved[0], strict=True):
            layer.quantize_weight = flag
        for aq, flag in zip(acts, saved[1], strict=True):
            aq.enabled = flag


class Reconstructor:
    """Sequential unit-wise reconstruction over a prepared `QuantModel`."""

    def __init__(self, qmodel: QuantModel, cfg: ReconConfig, seed: int = 0, device: torch.device | str = "cpu",
                 progress: Progress | None = None, store=None, cache: CacheSettings | None = None) -> None:
        self.qmodel, self.cfg, self.seed = qmodel, cfg, seed
        self.device = torch.device(device)
        if cfg.compile_fake_quant:
            check_compiler(self.device)
        self.cache = Cache(cache or CacheSettings(), torch.device(cfg.cache_device), cfg.cache_dtype)
        self.progress = progress or NullProgress()
        self.store = store
        depthwise = any(isinstance(m.layer, nn.Conv2d) and m.layer.groups > 1 for m in qmodel.quant_layers())
        self.round_weight = cfg.resolved_round_weight(depthwise)
        self.stats: list[UnitStats] = []
        self.during_seconds = 0.0  # the last unit's time in `during` (meta steps spread through reconstruction)
        self.estimate: JobEstimate | None = None

    # ---- hooks for methods built on the engine -------------------------------------------------
    def begin(self, images: torch.Tensor) -> None:
        """Called once before the first unit."""

    def extra_data(self, k: int, unit: nn.Module, data: UnitData) -> UnitData | None:
        """More training data for unit `k` (MetaAug: the transformed images); None for plain reconstruction."""
        return None

    # ---- the loop --------------------------------------------------------------------------------
    def with_views(self, images: torch.Tensor) -> torch.Tensor:
        """The calibration images followed by `aug_views` seeded random shift/flip views of each (fixed augmentation)."""
        if not self.cfg.aug_views:
            return images
        gen = torch.Generator().manual_seed(self.seed * 7 + 3)
        return torch.cat([images, *(augment(images, generator=gen) for _ in range(self.cfg.aug_views))])

    def run(self, images: torch.Tensor) -> list[UnitStats]:
        qm, cfg = self.qmodel, self.cfg
        chunk = 256
        images = self.with_views(images).to(cfg.cache_device)
        self.cache.track(images)
        fp = GraphStepper(qm, images, self.device, cfg.cache_device, chunk, self.cache)
        q = GraphStepper(qm, images, self.device, cfg.cache_device, chunk, self.cache)
        done, self.stats = (self.store.restore(qm) if self.store else (0, []))
        self.progress.start(list(qm.unit_names))
        if cfg.iters > 0 and done < len(qm.unit_names):
            self.estimate = estimate(qm, images, cfg.batch_size, cfg.iters, self.device, done)
            plan = getattr(self.progress, "plan", None)  # a progress written before `plan` existed still works
            if plan is not None:
                plan(self.estimate, self.cache.budget)
        self.begin(images)
        if done and self.store:
            state = self.store.restore_method_state()
            if state is not None:
                self.load_method_state(state)
        for k, name in enumerate(qm.unit_names):
            unit = qm.unit(k)
            with fp_mode(qm), torch.no_grad():
                fp_in = fp.advance_to(k)
            with torch.no_grad():
                q_in = q.advance_to(k)
            if k < done:
                qm.set_quant(True, True, unit)
                self.after_unit(k, unit)
                with torch.no_grad():
                    with fp_mode(qm):
                        fp.step()
                    q.step()
                continue
            torch.manual_seed(self.seed * 100_003 + k)
            with fp_mode(qm), torch.no_grad():
                fp_out = map_chunks(unit, fp_in, chunk, self.device, torch.device(cfg.cache_device), self.cache,
                                    f"{name} (FP output)")
            data = UnitData(q_in, fp_in, fp_out)
            self.init_quantizers(unit, data)
            self.progress.unit_start(k, name, cfg.iters)
            start = time.perf_counter()
            extra = self.extra_data(k, unit, data)
            meta_seconds = time.perf_counter() - start
            with threads(loop_threads()):
                stats = self.optimize(k, name, unit, data if extra is None else data.cat(extra))
            meta_seconds += self.during_seconds  # meta steps spread through reconstruction are meta time too
            stats.extra.update(self.unit_extra_stats(k), meta_seconds=round(meta_seconds, 3))
            stats.seconds = round(time.perf_counter() - start, 3)
            self.finalize_unit(unit)
            self.after_unit(k, unit)
            with fp_mode(qm):
                fp.step(fp_out)
            with torch.no_grad():
                q.step()
            self.stats.append(stats)
            if self.store:
                self.store.save(qm, k + 1, self.stats, self.method_state())
            self.progress.unit_end(k, stats)
        self.end()
        self.cache.close()
        return self.stats

    def end(self) -> None:
        """Called once after the last unit (release what `begin` set up)."""

    def engine_report(self) -> dict:
        """The report's `cache` entry (where caches lived) and, when reconstruction ran, its up-front `estimate`."""
        out = {"cache": self.cache.summary()}
        if self.estimate is not None:
            out["estimate"] = self.estimate.summary()
        return out

    def after_unit(self, k: int, unit: nn.Module) -> None:
        """Called when unit `k` is final (also when replayed on resume)."""

    def unit_extra_stats(self, k: int) -> dict:
        return {}

    def method_state(self) -> dict | None:
        """What a resumed run needs beyond the model's state (MetaAug: T, its optimiser and RNG); None if nothing."""
        return None

    def load_method_state(self, state: dict) -> None:
        """Restore what `method_state` returned when the run was saved."""

    def during(self, k: int, it: int, unit: nn.Module, data: UnitData) -> UnitData:
        """Called before each reconstruction step of unit `k`; returns the data to train on from then on (MetaAug
        with meta steps spread through reconstruction: steps T and refreshes T(x))."""
        return data

    @torch.no_grad()
    def init_quantizers(self, unit: nn.Module, data: UnitData) -> None:
        """Lp-search the unit's activation steps on its quantized-path inputs, then start rounding at FP."""
        qm = self.qmodel
        layers = list(qm.quant_layers(unit))
        for layer in layers:
            layer.quantize_weight = True
        acts = list(qm.act_quantizers(unit))
        sample = tuple(a[:OBSERVE_IMAGES] if is_rows(a) else a for a in data.q_in)
        with observing(acts):
            map_chunks(unit, sample, 128, self.device, self.device)
        for aq in acts:
            aq.enabled = True
        if self.cfg.learn_rounding and self.cfg.iters > 0:
            for layer in layers:
                layer.wq.init_rounding(layer.weight)

    def trainable(self, unit: nn.Module) -> list[dict]:
        """Adam parameter groups: rounding logits, activation steps, optionally weight steps (Genie-M)."""
        qm, cfg = self.qmodel, self.cfg
        groups = []
        if cfg.learn_rounding:
            groups.append({"params": [layer.wq.alpha for layer in qm.quant_layers(unit)], "lr": cfg.lr_round,
                           "name": "round"})
        if cfg.learn_act_scale:
            groups.append({"params": [aq.scale for aq in qm.act_quantizers(unit) if aq.enabled], "lr": cfg.lr_act,
                           "name": "act_scale"})
        if cfg.lr_weight_scale > 0:
            groups.append({"params": [layer.wq.scale for layer in qm.quant_layers(unit)], "lr": cfg.lr_weight_scale,
                           "name": "weight_scale"})
        groups = [g for g in groups if g["params"]]
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        return groups

    def optimize(self, k: int, name: str, unit: nn.Module, data: UnitData) -> UnitStats:
        cfg = self.cfg
        groups = self.trainable(unit)
        self.during_seconds = 0.0
        if cfg.iters == 0 or not groups:
            return UnitStats(name, 0, 0.0, 0.0)
        opt = torch.optim.Adam(groups)
        sched = scale_scheduler(opt, cfg)
        wqs = [layer.wq for layer in self.qmodel.quant_layers(unit)] if cfg.learn_rounding else []
        acts = list(self.qmodel.act_quantizers(unit))
        for aq in acts:
            aq.quant_prob = cfg.quant_prob
        n, first, last = data.size, None, None
        start = time.perf_counter()
        for it in range(cfg.iters):
            hook = time.perf_counter()
            data = self.during(k, it, unit, data)
            self.during_seconds += time.perf_counter() - hook
            idx = torch.randint(n, (cfg.batch_size,))
            inputs, target = data.batch(idx, cfg.quant_prob, self.device)
            with compute_context(self.device, cfg):
                pred = unit(*inputs)
            rec = output_error(pred, target)
            loss = rec + rounding_penalty(wqs, beta_at(it, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end),
                                          self.round_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if it == 0:
                first = float(rec.detach())  # the one host sync of the loop; it also times the first step
                first_ms = 1000 * (time.perf_counter() - start - self.during_seconds)
            if (it + 1) % 50 == 0 or it + 1 == cfg.iters:
                self.progress.advance(50 if (it + 1) % 50 == 0 else cfg.iters % 50)
        last = float(rec.detach())
        for aq in acts:
            aq.quant_prob = 1.0
        secs = time.perf_counter() - start - self.during_seconds  # reconstruction steps only
        stats = UnitStats(name, cfg.iters, round(secs, 3), round(1000 * secs / cfg.iters, 3), first, last)
        if cfg.iters > 1:  # a compiled step pays its compile time in the first iteration: report it apart
            stats.extra.update(first_iter_ms=round(first_ms, 3),
                               steady_ms_per_iter=round((1000 * secs - first_ms) / (cfg.iters - 1), 3))
        return stats

    def finalize_unit(self, unit: nn.Module) -> None:
        for layer in self.qmodel.quant_layers(unit):
            layer.wq.harden()
            layer.quantize_weight = True
        for aq in self.qmodel.act_quantizers(unit):
            aq.scale.requires_grad_(False)
            aq.enabled = bool(aq.initialized)

