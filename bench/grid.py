"""Benchmark grid: models x methods (or named variants) x W/A x calibration sizes x seeds.

Each run goes to its own folder under `<out>/runs/` (finished runs are skipped, interrupted ones resume), and the
table is rebuilt from all finished reports: `<out>/results.json` and `<out>/results.md` (mean ± std over seeds).

    python bench/grid.py --out bench/baselines --models resnet20 --methods rtn,adaround,brecq,qdrop \\
        --settings W4A4,W2A4,W2A2 --calib-sizes 1024 --seeds 0,1,2 --iters 2000

Variants: `--variant NAME=METHOD[:key=value,...]` (repeatable) runs METHOD with options under NAME, e.g.
`--variant paper=metaaug:inner_optimizer=adam_fresh,balance=none`
(`holdout`, `fold_bn`, `calib_source`, `synth`, `mixed_synth` and `softmax_grid` set the run, not the method). `--jobs N` runs N runs
at once in worker processes (each with `OMP_NUM_THREADS` threads; on a GPU they share it); `--ray` runs the grid on a
ray cluster.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import metaaug  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split

from metaaug.pipeline import RunConfig, run_job
from tables import mean_std, strip_run, write_results

RUN_KEYS = ("holdout", "fold_bn", "calib_source", "synth", "mixed_synth", "softmax_grid", "ln_reparam")  # variant options that set the run
SET_HELP = "method options key=value,... (e.g. lr_weight_scale=0: the paper's QDrop)"


def parse_options(text: str) -> dict:
    """`key=value,...` method options (values JSON where they parse, else strings), as `--set` and variants give them."""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def parse_variant(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition("=")
    method, _, opts = rest.partition(":")
    return name, method, parse_options(opts)


def jobs(a: argparse.Namespace) -> list[tuple[str, RunConfig]]:
    variants = [(m, m, {}) for m in filter(None, a.methods.split(","))] + [parse_variant(v) for v in a.variant]
    out = []
    for model in a.models.split(","):
        for name, method, options in variants:
            for setting in a.settings.split(","):
                w, _, act = setting.upper().removeprefix("W").partition("A")
                for calib in map(int, a.calib_sizes.split(",")):
                    for seed in map(int, a.seeds.split(",")):
                        opts = dict(options)
                        run = {"holdout": a.holdout, **{k: opts.pop(k) for k in RUN_KEYS if k in opts}}
                        cfg = RunConfig(model=model, method=method, wbits=int(w), abits=int(act), calib_size=calib,
                                        iters=a.iters, seed=seed, options=opts, data_dir=a.data_dir, **run)
                        out.append((f"{model}-{name}-w{w}a{act}-n{calib}-s{seed}", cfg))
    return out


def run_one(run_dir: str, cfg: RunConfig, device: str = "auto") -> dict:
    """A finished run's report, or the run; a finished folder that holds another config is refused, not reused."""
    report_path = Path(run_dir) / "report.json"
    if report_path.exists():
        cfg.store(run_dir)
        return json.loads(report_path.read_text())
    return run_job(cfg, run_dir, device=device)


class Runner:
    """Runs (folder, config) jobs `jobs` at a time in spawned worker processes (safe with CUDA), so the caller can go
    on (e.g. searching) while they run; with `jobs` <= 1 they run in this process, in order, at `results()`.
    `done(i, folder, report, seconds)` is called after each; a failed run stops the batch with its error."""

    def __init__(self, jobs: int = 1, device: str = "auto", done: Callable[[int, str, dict, float], None] | None = None) -> None:
        self.device, self.done, self.start = device, done, time.time()
        self.pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) if jobs > 1 else None
        self.todo: list[tuple[str, RunConfig]] = []
        self.futures: dict[Future, str] = {}

    def submit(self, todo: list[tuple[str, RunConfig]]) -> None:
        self.todo += todo
        if self.pool is not None:
            self.futures.update({self.pool.submit(run_one, run_dir, cfg, self.device): run_dir for run_dir, cfg in todo})

    def results(self) -> dict[str, dict]:
        """Every submitted run's report, keyed by folder, in submission order."""
        reports: dict[str, dict] = {}
        finished = ((run_dir, run_one(run_dir, cfg, self.device)) for run_dir, cfg in self.todo) if self.pool is None else (
            (self.futures[f], f.result()) for f in as_completed(self.futures))
        for i, (run_dir, report) in enumerate(finished):
            reports[run_dir] = report
            if self.done:
                self.done(i, run_dir, report, time.time() - self.start)
        if self.pool is not None:
            self.pool.shutdown()
        return {run_dir: reports[run_dir] for run_dir, _ in self.todo}


def summarise(reports: dict[str, dict], command: str, out: Path) -> None:
    groups: dict[tuple, list[dict]] = {}
    for key, rep in reports.items():
        variant = key.split("-")[1]
        groups.setdefault((rep["model"], variant, f"W{rep['wbits']}A{rep['abits']}", rep["calib_size"]), []).append(rep)
    rows = []
    for (model, variant, setting, calib), reps in sorted(groups.items()):
        hold = [r["holdout_top1"] for r in reps if "holdout_top1" in r]
        meta = [r["meta_seconds"] for r in reps if "meta_seconds" in r]
        rows.append({"model": model, "variant": variant, "setting": setting, "calib_size": calib, "seeds": len(reps),
                     "fp_top1": reps[0]["fp_top1"], "quant_top1": mean_std([r["quant_top1"] for r in reps]),
                     "gap": mean_std([r["calib_top1"] - r["quant_top1"] for r in reps]),
                     "holdout_top1": mean_std(hold) if hold else "-",
                     "seconds": f"{statistics.mean(r['seconds'] for r in reps):.0f}",
                     "meta_seconds": f"{statistics.mean(meta):.0f}" if meta else "-"})
    legend = ("quant_top1: test top-1 (%) of the quantized model, mean ± std over seeds; gap: calib_top1 - quant_top1 "
              "(train-test gap); holdout_top1: top-1 on the held-out part of the calibration set; seconds: wall time per "
              "run (see `threads` and `cpu` in results.json).")
    write_results(out, command, rows, {"runs": {k: strip_run(r) for k, r in sorted(reports.items())}}, legend)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default="resnet20")
    p.add_argument("--methods", default="rtn,adaround,brecq,qdrop")
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--settings", default="W4A4,W2A4,W2A2")
    p.add_argument("--calib-sizes", default="1024")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--holdout", type=float, default=0.0)
    p.add_argument("--data-dir", default=None, help="data folder (default Fashion-MNIST; bench/subset_data.py makes a smaller test split)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (worker processes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--ray", action="store_true", help="run the grid as ray tasks (pip install 'metaaug[ray]')")
    a = p.parse_args()
    command = "python bench/grid.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    todo = jobs(a)
    (a.out / "runs").mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict] = {}
    if a.ray:
        try:
            import ray
        except ImportError:
            sys.exit("--ray needs ray: pip install 'metaaug[ray]'")
        ray.init(ignore_reinit_error=True)
        remote = ray.remote(run_one)
        futures = {key: remote.remote(str(a.out / "runs" / key), cfg) for key, cfg in todo}
        reports = {key: ray.get(f) for key, f in futures.items()}
    else:
        def done(i: int, run_dir: str, r: dict, seconds: float) -> None:
            key = Path(run_dir).name
            reports[key] = r
            print(f"[{i + 1}/{len(todo)}] {key}: quant {r['quant_top1']} calib {r['calib_top1']} "
                  f"({r['seconds']:.0f}s; {seconds:.0f}s since the grid started)", flush=True)
            summarise(reports, command, a.out)

        runner = Runner(a.jobs, a.device, done)
        runner.submit([(str(a.out / "runs" / key), cfg) for key, cfg in todo])
        reports = {Path(run_dir).name: r for run_dir, r in runner.results().items()}
    summarise(reports, command, a.out)


if __name__ == "__main__":
    main()
