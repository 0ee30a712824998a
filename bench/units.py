"""Units found from the graph on the bundled models and on renamed-class copies, with QDrop top-1 on each.

    python bench/units.py --out bench/units --settings W2A4,W4A4 --seeds 0 --iters 2000

Each model's unit plan (name, how it was found, layers) is listed; a renamed copy must get the same units, and
then the same seed must give the same top-1. For ResNet-20 the table also shows the seed's result from
`bench/baselines` (made with the class-name block list this replaced).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import metaaug  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split

from grid import SET_HELP, parse_options, run_one
from metaaug.pipeline import RunConfig, build_quant_model
from tables import strip_run, write_results

WEIGHTS = "src/metaaug/models/weights/{}_fmnist.safetensors"
MODELS = {
    "resnet20": ("resnet20", None, "BasicBlock"),
    "resnet20-renamed": ("bench/renamed_models.py:resnet20_renamed", WEIGHTS.format("resnet20"), "ResUnit"),
    "mobilenetv2": ("mobilenetv2", None, "InvertedResidual"),
    "mobilenetv2-renamed": ("bench/renamed_models.py:mobilenetv2_renamed", WEIGHTS.format("mobilenetv2"), "InvRes"),
}


def baseline(model: str, w: int, a: int, seed: int) -> str:
    """The same run in bench/baselines (class-name blocks), where there is one."""
    path = Path(__file__).parent / "baselines" / "results.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    hit = runs.get(f"{model}-qdrop-w{w}a{a}-n1024-s{seed}")
    return f"{hit['quant_top1']:.2f}" if hit else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--settings", default="W2A4,W4A4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--set", default="", help=SET_HELP)
    a = p.parse_args()
    command = "python bench/units.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    (a.out / "runs").mkdir(parents=True, exist_ok=True)
    plans, codes, reports, rows = {}, {}, {}, []
    for key in a.models.split(","):
        model, weights, block_class = MODELS[key]
        q = build_quant_model(RunConfig(model=model, weights=weights, method="qdrop"))
        plans[key] = [{"name": u.name, "found": u.found, "layers": u.layers} for u in q.unit_plans]
        codes[key] = [q.unit(i).code for i in range(len(q.unit_names))]
        original = key.removesuffix("-renamed")
        same = "-" if original == key else ("yes" if (plans[key], codes[key]) == (plans.get(original), codes.get(original)) else "NO")
        kinds = {}
        for u in q.unit_plans:
            kinds[u.found] = kinds.get(u.found, 0) + 1
        for setting in a.settings.split(","):
            w, _, act = setting.upper().removeprefix("W").partition("A")
            for seed in map(int, a.seeds.split(",")):
                run = f"{key}-w{w}a{act}-s{seed}"
                cfg = RunConfig(model=model, weights=weights, method="qdrop", wbits=int(w), abits=int(act), calib_size=1024,
                                iters=a.iters, seed=seed, options=parse_options(a.set))
                reports[run] = run_one(str(a.out / "runs" / run), cfg)
                r = reports[run]
                print(f"{run}: {r['quant_top1']} ({r['seconds']:.0f}s)", flush=True)
                twin = reports.get(f"{original}-w{w}a{act}-s{seed}", {})
                same_top1 = "-" if original == key else ("yes" if twin.get("quant_top1") == r["quant_top1"] else "NO")
                rows.append({"model": key, "block class": block_class, "units": len(q.unit_plans),
                             "found": ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
                             "same units as original": same, "setting": f"W{w}A{act}", "seed": seed,
                             "fp_top1": r["fp_top1"], "quant_top1": f"{r['quant_top1']:.2f}",
                             "same top-1 as original": same_top1,
                             "bench/baselines (class names)": baseline(original, int(w), int(act), seed) if original == "resnet20" else "-",
                             "seconds": f"{r['seconds']:.0f}"})
                legend = (f"QDrop, 1024 calibration images, {a.iters} iterations per unit. units/found: the units the graph gave "
                          "(residual: a skip joined by add; module: a chain grouped by its owner module; layer: a lone "
                          "layer). same units: names, found-by, layers and the generated code of every unit are equal to "
                          "the original model's. Unit plans in results.json. bench/baselines: the same run from that "
                          "benchmark, made by earlier code (class-name blocks); the code just before graph discovery "
                          "(commit 8c67e00) gives 93.44 / 93.64 for ResNet-20 W2A4 / W4A4 seed 0, the same as here.")
                write_results(a.out, command, rows, {"unit_plans": plans,
                                                     "runs": {k: strip_run(v) for k, v in sorted(reports.items())}}, legend)


if __name__ == "__main__":
    main()
