"""A whole quantization job (data, model, method, evaluation, report), shared by the CLI and the benchmarks."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaaug.api import prepare_for, run_method
from metaaug.data import check_calibration, load_dataset
from metaaug.data.checks import check_model_fits_data
from metaaug.environment import environment, resolve_device
from metaaug.evaluate import top1
from metaaug.methods.registry import JobContext, config_dict, config_types, method_config
from metaaug.models.registry import build_model
from metaaug.progress import NullProgress, Progress
from metaaug.quant.cost import model_cost
from metaaug.quant.policy import Policy
from metaaug.quant.prepare import DEFAULT_ABITS, DEFAULT_WBITS, QuantModel, QuantSpec
from metaaug.recon.cache import CacheSettings
from metaaug.runs.files import RESTART_HINT, CorruptFileError
from metaaug.runs.folder import CONFIG, RunFolder
from metaaug.runs.store import QUANTIZED, REPORT, RunStore, load_state
from metaaug.synth.data import calibration_set

DEFAULT_CALIB_SIZE = 1024


@dataclass
class RunConfig:
    """Everything that defines a run's result; stored as `config.json` in the run folder."""

    model: str = "resnet20"
    weights: str | None = None
    method: str = "qdrop"
    wbits: int = DEFAULT_WBITS
    abits: int = DEFAULT_ABITS
    calib_size: int | None = DEFAULT_CALIB_SIZE
    iters: int | None = 2000
    seed: int = 0
    data_dir: str | None = None
    fold_bn: bool = True
    holdout: float = 0.0
    units: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    calib_source: str = "real"
    synth: str | None = None
    mixed_synth: int | None = None
    policy: dict[str, Any] | None = None  # per-layer bits, as in policy.json (overrides wbits/abits)
    softmax_grid: str = "uniform"  # grid of the quantizer on attention's softmax output (QuantSpec.softmax_grid)
    ln_reparam: bool = False  # LayerNorm channel reparameterisation (QuantSpec.ln_reparam)

    def __post_init__(self) -> None:
        from metaaug.config_check import SEED, check_config, coerce_options
        from metaaug.errors import ConfigError
        from metaaug.runs.sources import absolutize

        absolutize(self)
        # None: every synthetic image for `synthetic`; the default number of real images for `real` and `mixed`
        if self.calib_size is None and self.calib_source != "synthetic":
            self.calib_size = DEFAULT_CALIB_SIZE
        check_config(self, {"iters": ">= 0", "holdout": "[0, 1)", "seed": SEED, "mixed_synth": ">= 0"})
        if self.calib_size is not None and self.calib_size < 1:
            raise ConfigError(f"calib_size: calibration size must be positive, got {self.calib_size}")
        if self.iters is not None and "iters" in self.options:  # method_cfg would replace it with `iters`
            raise ConfigError(f"--set iters={self.options['iters']}: use --iters (RunConfig.iters) instead of --set")
        cls = config_types().get(self.method)
        if cls is not None:  # `--set` strings typed as the method's fields, so config.json stores values
            self.options = coerce_options(cls, self.options, self.method)

    def spec(self) -> QuantSpec:
        return QuantSpec(self.wbits, self.abits, fold_bn=self.fold_bn,
                         policy=None if self.policy is None else Policy.from_dict(self.policy), softmax_grid=self.softmax_grid,
                         ln_reparam=self.ln_reparam)

    def method_cfg(self):
        """The method's config with `options`, and `iters` where the method has iterations."""
        overrides = dict(self.options)
        cls = config_types().get(self.method)
        if self.iters is not None and cls is not None and iterates(cls):
            overrides["iters"] = self.iters
        return method_config(self.method, **overrides)

    def identity(self) -> dict[str, Any]:
        """The config as stored: run options plus the fully resolved method config."""
        return {**dataclasses.asdict(self), "method_config": config_dict(self.method_cfg())}

    def identity_defaults(self) -> dict[str, Any]:
        """Defaults of fields added since (the method config's, `softmax_grid`, `ln_reparam`): a run folder stored
        before a field existed still resumes."""
        return {"method_config": config_dict(type(self.method_cfg())()), "softmax_grid": "uniform", "ln_reparam": False}

    def store(self, out: str | Path, restart: bool = False) -> RunStore:
        """The run folder for this config (refuses one that holds another kind of run or another config)."""
        return RunStore(out, self.identity(), self.identity_defaults(), restart)

    def check_out(self, out: str | Path, restart: bool = False) -> None:
        """What `store` would refuse, found before any work and without writing anything."""
        RunFolder.check(out, "quantize", self.identity(), self.identity_defaults(), restart)


def iterates(cls: type) -> bool:
    """Whether a method config has iterations `--iters` sets (RTN's default of 0 says it has none)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return "iters" in fields and fields["iters"].default != 0


def build_quant_model(cfg: RunConfig) -> QuantModel:
    """The (empty) fake-quant model a run's saved state loads into (its state holds any reparameterised weights, so
    LayerNorm reparameterisation is not measured again)."""
    return prepare_for(build_model(cfg.model, cfg.weights), cfg.method_cfg(), dataclasses.replace(cfg.spec(), ln_reparam=False), cfg.units,
                       lambda: load_dataset(cfg.data_dir, "test").images[:2])


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[QuantModel, RunConfig, dict]:
    """Rebuild a finished run's quantized model from its folder."""
    run = RunFolder.open(run_dir, ("quantize",), "this command")
    weights = run.require(QUANTIZED, "finished run")
    run.require(REPORT, "finished run")  # killed between the weights and the report: rerunning finishes it
    report = run.read_json(REPORT, "a run report")
    cfg = stored_config(run)
    qmodel = build_quant_model(cfg)
    load_state(qmodel, weights)
    qmodel.harden()
    qmodel.set_quant(True, True)
    qmodel = qmodel.to(resolve_device(device)).eval()
    return qmodel, cfg, report


def stored_config(run: RunFolder) -> RunConfig:
    """The RunConfig a quantize run folder was written with (one line if its config.json is not one)."""
    stored = dict(run.config)
    stored.pop("method_config", None)
    try:
        return RunConfig(**stored)
    except TypeError as err:
        raise CorruptFileError(f"{run.file(CONFIG)} is not a quantize run config ({err}); {RESTART_HINT}") from None


def run_job(cfg: RunConfig, out: str | Path, device: str = "auto", progress: Progress | None = None,
            restart: bool = False, cache: CacheSettings | None = None) -> dict[str, Any]:
    """Quantize per `cfg`, evaluate, and write `report.json` and `quantized.safetensors` into `out` (resuming what
    is there; `restart` starts over). `cache`: the reconstruction caches' memory budget and spill folder (not part
    of the run's identity: they change speed, not the result)."""
    start = time.perf_counter()
    cfg.check_out(out, restart)
    spec, mcfg = cfg.spec(), cfg.method_cfg()
    dev = resolve_device(device)
    model = build_model(cfg.model, cfg.weights)
    train, test = load_dataset(cfg.data_dir, "train"), load_dataset(cfg.data_dir, "test")
    check_model_fits_data(model, cfg.data_dir, train=train, test=test)  # labels the model can score, before any work
    calib, holdout = calibration_set(train, cfg.calib_source, cfg.synth, cfg.calib_size, cfg.seed, cfg.holdout,
                                     cfg.mixed_synth)
    check_calibration(calib.images)  # before the run folder exists: a refused run leaves nothing behind
    qmodel = prepare_for(model, mcfg, spec, cfg.units, calib.images).to(dev)
    store = cfg.store(out, restart)
    fp_top1 = top1(model.to(dev), test, device=dev)
    ctx = JobContext(calib.images, calib.labels, holdout, store, progress or NullProgress(), Path(out), cfg.seed, dev,
                     cache)
    result = run_method(qmodel, mcfg, ctx)
    qmodel, stats = result.model, result.stats
    report: dict[str, Any] = {
        "model": cfg.model, "method": cfg.method, "wbits": cfg.wbits, "abits": cfg.abits, "softmax_grid": cfg.softmax_grid,
        "ln_reparam": cfg.ln_reparam,
        "calib_size": cfg.calib_size if cfg.calib_size is not None else len(calib) + (0 if holdout is None else len(holdout)),
        "iters": getattr(mcfg, "iters", None), "seed": cfg.seed, "method_config": config_dict(mcfg),
        "calib_source": cfg.calib_source, "synth": cfg.synth, "mixed_synth": cfg.mixed_synth,
        "calib_images": len(calib) + (0 if holdout is None else len(holdout)),
        "fp_top1": round(fp_top1, 2),
        "quant_top1": round(top1(qmodel, test, device=dev), 2),
        "calib_top1": round(top1(qmodel, calib, device=dev), 2),
    }
    if cfg.policy is not None:
        report["policy"] = cfg.spec().policy.to_dict()
    report["cost"] = model_cost(qmodel, calib.images)
    if holdout is not None:
        report["holdout_top1"] = round(top1(qmodel, holdout, device=dev), 2)
    recon = sum(s.seconds - s.extra.get("meta_seconds", 0.0) for s in stats)
    report.update({
        "seconds": round(time.perf_counter() - start + store.prior_seconds, 1),  # an interrupted attempt's time counts
        "resumed_units": store.resumed_units,
        "recon_seconds": round(recon, 1),
        "units": [dataclasses.asdict(s) for s in stats],
        "unit_plan": [dataclasses.asdict(p) for p in qmodel.unit_plans],
        **environment(dev),
    })
    report.update(result.report)
    store.finish(qmodel, report)
    return report
