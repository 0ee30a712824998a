"""FDDA synthetic calibration data vs real data: qdrop with real, synthetic, data-free synthetic and mixed calibration.

Per model and seed, two synthetic sets are generated with FDDA (`metaaug synth`): `fdda` (class BNS centres from
1 real training image per class) and `datafree` (no real image: global BNS + CE only). Then every setting runs with
    real      --calib-size real images (as today)
    fewreal   --mixed-real real images alone (what `mixed` must beat)
    synthetic --calib-size images sampled from the fdda set
    datafree  --calib-size images sampled from the datafree set
    mixed     --mixed-real real images + the whole fdda set
    mixedN    --mixed-real real images + N images of the fdda set (e.g. mixed64: as many synthetic as real images)
Synthetic folders go to `<out>/synth/`, runs to `<out>/runs/` (finished ones are skipped, interrupted ones resume);
the table is rebuilt into `<out>/results.json` and `<out>/results.md`.

    python bench/synth.py --out bench/synth --models resnet20,mobilenetv2 --settings W4A4,W2A4 --seeds 0,1,2 \\
        --steps 2000 --iters 2000
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import metaaug  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split

from grid import SET_HELP, parse_options
from metaaug.data import load_dataset
from metaaug.environment import resolve_device
from metaaug.models.registry import build_model
from metaaug.pipeline import RunConfig, run_job
from metaaug.synth import FDDAConfig, save_synth, synthesize
from tables import mean_std, strip_run, write_results

SOURCES = ("real", "fewreal", "synthetic", "datafree", "mixed")


def source_order(source: str) -> tuple[int, int]:
    """Table order: SOURCES order, `mixedN` after `mixed` by N."""
    if source in SOURCES:
        return SOURCES.index(source), 0
    return len(SOURCES), mixed_size(source) or 0


def mixed_size(source: str) -> int | None:
    """N of a `mixedN` source (synthetic images added to the real ones); None for every other source."""
    rest = source.removeprefix("mixed")
    return int(rest) if rest.isdigit() and source.startswith("mixed") else None


def synth_kind(source: str) -> str | None:
    """The synthetic set a source draws from (`fdda` or `datafree`); None for real images only."""
    return "datafree" if source == "datafree" else "fdda" if source == "synthetic" or source.startswith("mixed") else None


def make_synth(folder: Path, model: str, cfg: FDDAConfig, device: str) -> dict:
    """Generate one synthetic set unless `folder` already holds it; returns its report."""
    report_path = folder / "report.json"
    if report_path.exists():
        return json.loads(report_path.read_text())
    real = load_dataset(None, "train") if cfg.real_per_class > 0 else None
    result = synthesize(build_model(model), cfg, real, resolve_device(device))
    result.report["model"] = model
    save_synth(result, folder, f"FDDA synthetic images ({model}, {folder.name})")
    return result.report


def jobs(a: argparse.Namespace) -> list[tuple[str, RunConfig]]:
    out = []
    for model in a.models.split(","):
        for setting in a.settings.split(","):
            w, _, act = setting.upper().removeprefix("W").partition("A")
            for seed in map(int, a.seeds.split(",")):
                for source in a.sources.split(","):
                    kind, mixed = synth_kind(source), source.startswith("mixed")
                    synth = str(a.out / "synth" / f"{model}-{kind}-s{seed}") if kind else None
                    calib_source = "mixed" if mixed else "synthetic" if kind else "real"
                    n = a.mixed_real if mixed or source == "fewreal" else a.calib_size
                    cfg = RunConfig(model=model, method=a.method, wbits=int(w), abits=int(act), calib_size=n, iters=a.iters,
                                    seed=seed, calib_source=calib_source, synth=synth, mixed_synth=mixed_size(source),
                                    options=parse_options(a.set))
                    out.append((f"{model}-{source}-w{w}a{act}-s{seed}", cfg))
    return out


def summarise(reports: dict[str, dict], synth: dict[str, dict], command: str, label: str, out: Path) -> None:
    groups: dict[tuple, list[dict]] = {}
    for key, rep in reports.items():
        groups.setdefault((rep["model"], key.split("-")[1], f"W{rep['wbits']}A{rep['abits']}"), []).append(rep)

    rows = []
    for (model, source, setting), reps in sorted(groups.items(), key=lambda g: (g[0][0], g[0][2], source_order(g[0][1]))):
        kind = synth_kind(source)
        syn = [s for k, s in synth.items() if kind and k.startswith(f"{model}-{kind}-")]
        rows.append({"model": model, "source": source, "setting": setting, "seeds": len(reps), "fp_top1": reps[0]["fp_top1"],
                     "calib_images": reps[0]["calib_images"], "quant_top1": mean_std([r["quant_top1"] for r in reps]),
                     "calib_top1": mean_std([r["calib_top1"] for r in reps]),
                     "synth_fp_acc": mean_std([s["fp_accuracy"] for s in syn]) if syn else "-",
                     "synth_bns": mean_std([s["bns_distance"]["after"]["global"] for s in syn]) if syn else "-",
                     "synth_seconds": f"{statistics.mean(s['seconds'] for s in syn):.0f}" if syn else "-",
                     "seconds": f"{statistics.mean(r['seconds'] for r in reps):.0f}"})
    payload = {"synth": {k: {kk: v for kk, v in s.items() if kk != "loss_history"} for k, s in sorted(synth.items())},
               "runs": {k: strip_run(r) for k, r in sorted(reports.items())}}
    legend = ("quant_top1: test top-1 (%) of the quantized model, mean ± std over seeds; calib_top1: top-1 of the quantized model "
              "on its own calibration set (generator labels for synthetic images); synth_fp_acc: FP model's top-1 on the synthetic "
              "set; synth_bns: global BN-statistics distance of generated batches after training; seconds: wall time per run.")
    write_results(out, command, rows, payload, legend, label)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default="resnet20,mobilenetv2")
    p.add_argument("--method", default="qdrop")
    p.add_argument("--set", default="", help=SET_HELP)
    p.add_argument("--settings", default="W4A4,W2A4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, from {', '.join(SOURCES)}, mixedN")
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--mixed-real", type=int, default=64, help="real images in the mixed calibration set")
    p.add_argument("--real-per-class", type=int, default=1, help="real images per class for the fdda class centres")
    p.add_argument("--steps", type=int, default=2000, help="FDDA generator steps")
    p.add_argument("--iters", type=int, default=2000, help="reconstruction iterations per unit")
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default="", help="a line put at the top of results.md (e.g. 'SMOKE RUN')")
    a = p.parse_args()
    for source in a.sources.split(","):
        if source not in SOURCES and mixed_size(source) is None:
            p.error(f"unknown source {source!r}; use {', '.join(SOURCES)} or mixedN (N synthetic images)")
    command = "python bench/synth.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    (a.out / "runs").mkdir(parents=True, exist_ok=True)
    per_class = math.ceil(a.calib_size / 10)  # the bundled models have 10 classes
    synth: dict[str, dict] = {}
    for model in a.models.split(","):
        for seed in map(int, a.seeds.split(",")):
            for kind, real_pc in (("fdda", a.real_per_class), ("datafree", 0)):
                key = f"{model}-{kind}-s{seed}"
                t = time.time()
                cfg = FDDAConfig(per_class=per_class, steps=a.steps, real_per_class=real_pc, seed=seed)
                synth[key] = make_synth(a.out / "synth" / key, model, cfg, a.device)
                s = synth[key]
                print(f"synth {key}: FP acc {s['fp_accuracy']} bns {s['bns_distance']['after']['global']:.4f} "
                      f"({time.time() - t:.0f}s)", flush=True)
    reports: dict[str, dict] = {}
    todo = jobs(a)
    for i, (key, cfg) in enumerate(todo):
        t = time.time()
        run_dir = a.out / "runs" / key
        done = run_dir / "report.json"
        reports[key] = json.loads(done.read_text()) if done.exists() else run_job(cfg, run_dir, device=a.device)
        r = reports[key]
        print(f"[{i + 1}/{len(todo)}] {key}: quant {r['quant_top1']} calib {r['calib_top1']} ({time.time() - t:.0f}s)", flush=True)
        summarise(reports, synth, command, a.label, a.out)
    summarise(reports, synth, command, a.label, a.out)


if __name__ == "__main__":
    main()
