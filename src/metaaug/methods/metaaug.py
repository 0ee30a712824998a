"""MetaAug (Pham et al., ECCV 2024): meta-learned calibration augmentation, as a meta phase per unit.

Per unit (first and last layer excepted): for `meta_iters` steps, take one differentiable inner step on the
unit's quantizer parameters using `T(x)`, then update `T` so the stepped quantized model matches the FP model on
validation images (KL), while `T` keeps moving `x` (margin) and preserves the FP features' structure (PKT).
The unit is then reconstructed by the QDrop loop on `x` together with `T(x)`.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.func import functional_call

from metaaug.data.augment import augment
from metaaug.environment import loop_threads, threads
from metaaug.errors import DataError
from metaaug.methods.meta_losses import distill_kl, margin, mixup_pair, pkt
from metaaug.methods.meta_schedule import SpreadPlan, curve_point, full_quantization, rows_of, spread_positions
from metaaug.methods.metaaug_config import MetaAugConfig
from metaaug.methods.registry import JobContext, MethodResult, register_method
from metaaug.methods.transform import TransformNet
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import ActQuantizer, WeightQuantizer, qdrop_mix
from metaaug.recon.engine import Reconstructor, UnitData, fp_mode
from metaaug.recon.loss import output_error
from metaaug.recon.stepper import GraphStepper, map_chunks
from metaaug.synth.data import load_synthetic


class MetaAugReconstructor(Reconstructor):
    """QDrop reconstruction plus MetaAug's meta phase and transformed training images."""

    def __init__(self, *args, holdout_images: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.holdout_images = holdout_images
        self.meta_log: list[dict] = []
        self.curves: dict[str, list[dict]] = {}
        self.spread: SpreadPlan | None = None

    # ---- set-up ------------------------------------------------------------------------------------
    def begin(self, images: torch.Tensor) -> None:
        cfg: MetaAugConfig = self.cfg
        qm = self.qmodel
        gen = torch.Generator().manual_seed(self.seed * 7 + 1)
        self.calib = images
        torch.manual_seed(self.seed * 7 + 2)
        self.tnet = TransformNet(images.shape[1], cfg.t_width, len(qm.unit_names) if cfg.t_per_unit else 0).to(self.device)
        self.t_opt = torch.optim.Adam(self.tnet.parameters(), lr=cfg.lr_t)
        self.gen = gen
        self.val_images, self.validation = self.validation_images(images, gen)
        with fp_mode(qm), torch.no_grad():
            self.val_fp_logits = map_chunks(qm, (self.val_images,), 256, self.device, self.device)
        self.val_stepper = GraphStepper(qm, self.val_images, self.device, cfg.cache_device)
        last = list(qm.quant_layers())[-1]
        self._feat: list[torch.Tensor] = []
        self._hook = last.register_forward_pre_hook(lambda _m, args: self._feat.append(args[0]) if self._capture else None)
        self._capture = False
        n = len(qm.unit_names)
        self.meta_units = list(range(1, n - 1))  # first conv and last linear skip the meta phase
        self.snapshots: list[tuple[str, torch.Tensor]] = [("x", images[:8].clone())]

    def validation_images(self, images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, str]:
        """The images T is validated on, and their name: the held-out split if the job has one, else the calibration
        set; with `val_views`, that many random shift/flip views of each instead of the images themselves. At 1-3
        images per class reconstruction fits the calibration images exactly (top-1 100%), so their own KL says
        nothing about generalisation, while views never seen by reconstruction do."""
        if self.cfg.val_synth is not None:
            base, name = self.synthetic_validation(images), "synthetic"
        elif self.holdout_images is not None:
            base, name = self.holdout_images, "holdout"
        else:
            base, name = images, "calib"
        if not self.cfg.val_views:
            return base, name
        views = torch.cat([augment(base, generator=gen) for _ in range(self.cfg.val_views)])
        return views, f"{name}-views-{self.cfg.val_views}"

    def synthetic_validation(self, images: torch.Tensor) -> torch.Tensor:
        """The `val_synth` folder's images, checked against the calibration images' shape."""
        syn = load_synthetic(self.cfg.val_synth).images
        if syn.shape[1:] != images.shape[1:]:
            raise DataError(f"val_synth images are {tuple(syn.shape[1:])} but the calibration images are "
                            f"{tuple(images.shape[1:])}")
        return syn

    def end(self) -> None:
        """Drop the hook and the validation caches."""
        self._hook.remove()
        self.val_stepper = self.val_fp_logits = None

    @torch.no_grad()
    def after_unit(self, k: int, unit: nn.Module) -> None:
        self.val_stepper.advance_to(k)
        self.val_stepper.step()

    # ---- one meta step ------------------------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """FP penultimate features (the last layer's input), with gradient to x."""
        self._feat.clear()
        self._capture = True
        try:
            with fp_mode(self.qmodel):
                self.qmodel(x)
        finally:
            self._capture = False
        return self._feat[-1]

    def _prefix(self, k: int, x: torch.Tensor) -> tuple[tuple, tuple]:
        """Unit k's inputs for images `x` on the quantized and FP paths, differentiable in x."""
        q_args = GraphStepper(self.qmodel, x, self.device, self.device, None).advance_to(k)
        with fp_mode(self.qmodel):
            fp_args = GraphStepper(self.qmodel, x, self.device, self.device, None).advance_to(k)
        return q_args, fp_args

    def _inner_step(self, loss: torch.Tensor, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """theta' = theta - step(grad), differentiable in grad. Each group uses its reconstruction lr."""
        cfg: MetaAugConfig = self.cfg
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True, allow_unused=True)
        out = {}
        for (name, p), g in zip(theta.items(), grads, strict=True):
            lr = cfg.lr_round if name.endswith("alpha") else cfg.lr_act
            if g is None:
                out[name] = p
            elif cfg.inner_optimizer == "sgd":
                # differentiable SGD, as long as `inner_lookahead` Adam steps of the reconstruction: the gradient is
                # divided by its (detached) RMS, so the step stays linear in the gradient (second-order signal to T)
                out[name] = p - cfg.inner_lookahead * lr * g / (g.detach().pow(2).mean().sqrt() + 1e-12)
            else:
                # the released code: a fresh Adam state each step, whose first step is lr * g / (|g| + eps):
                # nearly constant in g, so almost no signal flows back to T
                out[name] = p - lr * g / (g.abs() + 1e-8)
        return out

    def _inner_params(self, unit: nn.Module) -> dict[str, torch.Tensor]:
        """Detached copies of the unit's rounding logits and activation steps: the inner step's variables."""
        theta = {}
        for name, mod in unit.named_modules():
            if isinstance(mod, WeightQuantizer) and mod.alpha.numel():
                theta[f"{name}.alpha"] = mod.alpha
            elif isinstance(mod, ActQuantizer) and mod.enabled:
                theta[f"{name}.scale"] = mod.scale
        return {n: p.detach().clone().requires_grad_(True) for n, p in theta.items()}

    def meta_terms(self, k: int, unit: nn.Module, theta: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The outer-loss terms for one meta step, and the transformed batch T(x) they all depend on T through."""
        cfg: MetaAugConfig = self.cfg
        n, b = self.calib.shape[0], cfg.meta_batch
        x = self.calib[torch.randint(n, (b * cfg.inner_steps,), generator=self.gen)].to(self.device)
        tx = self.tnet(x, k)
        q_in, fp_in = self._prefix(k, tx)
        with fp_mode(self.qmodel):
            fp_out = unit(*fp_in)
        mixed = [qdrop_mix(q, f, cfg.quant_prob) if isinstance(q, torch.Tensor) else q for q, f in zip(q_in, fp_in, strict=True)]
        # no rounding term: its gradient does not depend on T (and the default schedule takes every meta step in the
        # rounding regulariser's warm-up)
        new_theta = theta
        for s in range(cfg.inner_steps):  # each inner step on its own slice of the batch
            rows = slice(s * b, (s + 1) * b)
            args = tuple(a[rows] if isinstance(a, torch.Tensor) else a for a in mixed)
            train_loss = output_error(functional_call(unit, new_theta, args), rows_of(fp_out, rows))
            new_theta = self._inner_step(train_loss, new_theta)
        tx_aux, x_aux = tx[:b], x[:b]

        terms: dict[str, torch.Tensor] = {}
        if "kl" in cfg.terms or "mse" in cfg.terms:
            vidx = torch.randint(self.val_images.shape[0], (cfg.meta_batch,), generator=self.gen)
            view = self.val_stepper.batch_view(vidx, self.device)
            v_args = view.advance_to(k)
            view.step(functional_call(unit, new_theta, v_args))
            logits = view.finish()
            target = self.val_fp_logits[vidx.to(self.device)]
            if "kl" in cfg.terms:
                terms["kl"] = distill_kl(logits, target, cfg.temperature)
            if "mse" in cfg.terms:
                terms["mse"] = ((logits - target) ** 2).mean()
        if "margin" in cfg.terms:
            terms["margin"] = margin(tx_aux, x_aux, cfg.eps)
        if "pkt" in cfg.terms:
            mt, mx = mixup_pair(tx_aux, x_aux, self.gen)
            with torch.no_grad():
                fx = self._features(mx)
            terms["pkt"] = pkt(self._features(mt), fx)
        return terms, tx

    def _weights(self) -> dict[str, float]:
        cfg: MetaAugConfig = self.cfg
        return {"kl": cfg.alpha, "mse": cfg.alpha, "margin": cfg.beta, "pkt": cfg.gamma}

    @staticmethod
    def term_grads(terms: dict[str, torch.Tensor], tx: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Each term's gradient with respect to the transformed images T(x), and its norm.

        Every term reaches T only through T(x), so balancing in image space and back-propagating through T once
        gives the same update as per-parameter gradients at a third of T's backward cost.
        """
        grads, norms = {}, {}
        for name, term in terms.items():
            (g,) = torch.autograd.grad(term, tx, retain_graph=True, allow_unused=True)
            grads[name] = torch.zeros_like(tx) if g is None else g
            norms[name] = float(grads[name].norm())
        return grads, norms

    def meta_step(self, k: int, unit: nn.Module, theta: dict[str, torch.Tensor]) -> dict[str, float]:
        """One outer update of T: per-term gradients on T(x), weighted and capped, one backward through T, Adam."""
        cfg: MetaAugConfig = self.cfg
        terms, tx = self.meta_terms(k, unit, theta)
        log: dict[str, float] = {name: float(v.detach()) for name, v in terms.items()}
        grads, norms = self.term_grads(terms, tx)
        weights = self._weights()
        val_norm = sum(weights[n] * norms[n] for n in ("kl", "mse") if n in norms)
        combined = torch.zeros_like(tx)
        for name, g in grads.items():
            log[f"grad_{name}"] = norms[name]
            scale = weights[name]
            if cfg.balance == "cap" and name in ("margin", "pkt") and val_norm > 0 and scale * norms[name] > 0:
                scale = min(scale, cfg.aux_cap * val_norm / norms[name])
            combined.add_(g, alpha=scale)
        self.t_opt.zero_grad(set_to_none=True)
        tx.backward(combined)
        torch.nn.utils.clip_grad_norm_(self.tnet.parameters(), cfg.clip)
        self.t_opt.step()
        return log

    def gradient_probe(self, images: torch.Tensor, k: int) -> dict[str, float]:
        """Norm of each outer-loss term's gradient on T's parameters at unit `k` (earlier units FP); T is not updated."""
        self.begin(images)
        unit = self.qmodel.unit(k)
        q_in = GraphStepper(self.qmodel, images, self.device).advance_to(k)
        with fp_mode(self.qmodel):
            fp_in = GraphStepper(self.qmodel, images, self.device).advance_to(k)
        self.init_quantizers(unit, UnitData(q_in, fp_in, None))
        self.val_stepper.advance_to(k)
        torch.manual_seed(self.seed)
        try:
            terms, tx = self.meta_terms(k, unit, self._inner_params(unit))
        finally:
            self.end()
        grads, _ = self.term_grads(terms, tx)
        params = list(self.tnet.parameters())
        out = {}
        for name, g in grads.items():
            pg = torch.autograd.grad(tx, params, grad_outputs=g, retain_graph=True, allow_unused=True)
            out[name] = math.sqrt(sum(float(x.pow(2).sum()) for x in pg if x is not None))
        return out

    # ---- engine hooks ---------------------------------------------------------------------------------
    def extra_data(self, k: int, unit: nn.Module, data: UnitData) -> UnitData | None:
        cfg: MetaAugConfig = self.cfg
        with torch.no_grad():
            self.val_stepper.advance_to(k)
        if k in self.meta_units:
            steps = cfg.meta_iters_for(self.meta_units.index(k), len(self.meta_units))
            positions = spread_positions(steps, cfg.iters)
            if cfg.meta_schedule == "spread" and positions:
                self.spread = SpreadPlan(k, data, positions)
            elif cfg.meta_schedule == "spread":
                self._finish_meta(k, 0, 0.0, [])
            else:
                theta = self._inner_params(unit)
                curve: list[dict] = []
                start = time.perf_counter()
                with threads(loop_threads()):
                    for it in range(steps):
                        curve_point(curve, it, self.meta_step(k, unit, theta), it % cfg.log_every == 0 or it == steps - 1)
                self._finish_meta(k, steps, time.perf_counter() - start, curve)
        if not cfg.use_transformed:
            return None
        return self._transformed_data(k, unit)

    def during(self, k: int, it: int, unit: nn.Module, data: UnitData) -> UnitData:
        """With `meta_schedule='spread'`: at the planned steps, one meta step from the unit's current rounding and
        steps, then the transformed half of the training data re-rendered with the updated T."""
        plan = self.spread
        if plan is None or plan.unit != k or it != plan.at[len(plan.done)]:  # O(1): a check on every step
            return data
        start = time.perf_counter()
        with full_quantization(self.qmodel, unit):  # the meta step sees the unit as the "before" schedule does
            log = self.meta_step(k, unit, self._inner_params(unit))
        i, last = len(plan.done), len(plan.at)
        plan.done.append(it)
        curve_point(plan.curve, it, log, i % self.cfg.log_every == 0 or i == last - 1)
        data = plan.real.cat(self._transformed_data(k, unit))
        plan.seconds += time.perf_counter() - start
        if i == last - 1:
            self._finish_meta(k, last, plan.seconds, plan.curve)
            self.spread = None
        return data

    def _finish_meta(self, k: int, steps: int, secs: float, curve: list[dict]) -> None:
        """Record unit k's meta curve, summary and a snapshot of T on the first calibration images."""
        self.curves[self.qmodel.unit_names[k]] = curve
        self.meta_log.append(self._summary(k, steps, secs, curve))
        with torch.no_grad():
            self.snapshots.append((self.qmodel.unit_names[k], self.tnet(self.calib[:8].to(self.device), k).cpu()))

    @torch.no_grad()
    def _transformed_data(self, k: int, unit: nn.Module) -> UnitData:
        tx = map_chunks(lambda x: self.tnet(x, k), (self.calib,), 256, self.device, torch.device(self.cfg.cache_device))
        cache = torch.device(self.cfg.cache_device)
        q = GraphStepper(self.qmodel, tx, self.device, cache, cache=self.cache).advance_to(k)
        with fp_mode(self.qmodel):
            fp = GraphStepper(self.qmodel, tx, self.device, cache, cache=self.cache).advance_to(k)
            fp_out = map_chunks(unit, fp, 256, self.device, cache, self.cache, "T(x) FP output")
        return UnitData(q, fp, fp_out)

    def _summary(self, k: int, steps: int, secs: float, curve: list[dict]) -> dict:
        tail = curve[-max(1, len(curve) // 5):]  # the last fifth: where T has settled
        keys = [key for key in curve[0] if key != "step"] if curve else []
        mean = {key: round(sum(c[key] for c in tail) / len(tail), 6) for key in keys}
        start = {f"{key}_start": curve[0][key] for key in ("kl", "mse") if curve and key in curve[0]}
        return {"unit": self.qmodel.unit_names[k], "meta_iters": steps, "meta_seconds": round(secs, 2),
                "ms_per_meta_iter": round(1000 * secs / max(1, steps), 1), **start, **mean}

    def unit_extra_stats(self, k: int) -> dict:
        name = self.qmodel.unit_names[k]
        return next(({kk: v for kk, v in m.items() if kk != "unit"} for m in self.meta_log if m["unit"] == name), {})

    def method_state(self) -> dict:
        """T, its Adam state, the meta-batch RNG and the logs so far: a resumed run continues exactly."""
        return {"tnet": self.tnet.state_dict(), "t_opt": self.t_opt.state_dict(), "gen": self.gen.get_state(),
                "meta_log": self.meta_log, "curves": self.curves, "snapshots": self.snapshots}

    def load_method_state(self, state: dict) -> None:
        self.tnet.load_state_dict(state["tnet"])
        self.t_opt.load_state_dict(state["t_opt"])
        self.gen.set_state(state["gen"])
        self.meta_log, self.curves, self.snapshots = state["meta_log"], state["curves"], state["snapshots"]

    def report(self) -> dict:
        """Method-specific report fields: meta time, validation source, per-unit meta losses."""
        meta = sum(m["meta_seconds"] for m in self.meta_log)
        return {"meta_seconds": round(meta, 1), "validation": self.validation, "meta_units": self.meta_log}



@register_method(MetaAugConfig)
def metaaug(qmodel: QuantModel, cfg: MetaAugConfig, ctx: JobContext) -> MethodResult:
    """Run MetaAug; validate on the held-out split when the job has one; write its figures to the job's folder."""
    engine = MetaAugReconstructor(qmodel, cfg, seed=ctx.seed, device=ctx.device, progress=ctx.progress, store=ctx.store,
                                  cache=ctx.cache, holdout_images=None if ctx.holdout is None else ctx.holdout.images)
    stats = engine.run(ctx.images)
    report = {**engine.report(), **engine.engine_report()}
    if ctx.out_dir is not None:
        from metaaug.viz import save_meta_plots

        report["plots"] = save_meta_plots(ctx.out_dir, engine.snapshots, engine.curves)
    return MethodResult(qmodel, stats, report)
