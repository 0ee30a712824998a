"""Reconstruction-recipe ablation: every variant against QDrop's paper recipe at the same model, setting, images, iterations.

Reads `bench/grid.py` result folders (their runs and the `--variant` definitions in their commands) and writes
`<out>/results.md` and `<out>/results.json`: one row per (model, setting, calibration size, iterations, variant)
with the variant's options, test top-1 (mean ± std over seeds), the train-test gap, and the difference to the mean of QDrop's
paper recipe (the variant named qdrop) in the same cell; `beyond_2std` says whether that difference exceeds twice the larger of the two stds.

    python bench/recipe.py --out bench/recipe bench/baselines bench/recipe/resnet20_w2a2_i500 ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from grid import parse_variant
from tables import mean_std, write_results

BASELINE = "qdrop"
PAPER = "qdrop (paper: weight steps fixed)"


def variants_of(command: str) -> dict[str, str]:
    """`name -> "method key=value ..."` for the plain methods and `--variant`s of a grid command."""
    argv = shlex.split(command)
    out = {}
    for i, tok in enumerate(argv[:-1]):
        if tok == "--methods":
            out.update({m: m for m in filter(None, argv[i + 1].split(","))})
        elif tok == "--variant":
            name, method, opts = parse_variant(argv[i + 1])
            out[name] = " ".join([method, *(f"{k}={v}" for k, v in opts.items())])
    return out


def recipe_of(variant: str, given: str, method_config: dict | None) -> str:
    """The recipe as given, marked where QDrop's weight steps were fixed.

    A variant named qdrop is the paper's recipe (the default before learned weight steps, or set explicitly). Runs
    whose report predates `method_config` ran QDrop and MetaAug with fixed weight steps unless the grid set them.
    """
    if variant == BASELINE:
        return PAPER
    method = given.split()[0]
    if method in ("qdrop", "metaaug") and "lr_weight_scale" not in given:
        fixed = (method_config or {}).get("lr_weight_scale", 0.0) == 0.0
        return f"{given} (weight steps fixed)" if fixed else given
    return given


def load_runs(folders: list[Path], settings: set[str] | None = None, calib_sizes: set[int] | None = None) -> list[dict]:
    """Every finished run of the folders, once (the same recipe and seed in two folders counts once)."""
    seen, runs = set(), []
    for folder in folders:
        if not (folder / "results.json").exists():
            sys.exit(f"{folder} has no results.json: run `bench/grid.py --out {folder} ...` first")
        res = json.loads((folder / "results.json").read_text())
        recipes = variants_of(res["command"])
        for key, rep in res["runs"].items():
            variant = key.split("-")[1]
            recipe = recipe_of(variant, recipes.get(variant, variant), rep.get("method_config"))
            if (settings and f"W{rep['wbits']}A{rep['abits']}" not in settings) or (
                    calib_sizes and rep["calib_size"] not in calib_sizes):
                continue
            ident = (rep["model"], recipe, rep["wbits"], rep["abits"], rep["calib_size"], rep["iters"], rep["seed"])
            if ident not in seen:
                seen.add(ident)
                runs.append({**rep, "variant": variant, "recipe": recipe})
    return runs


def rows_of(runs: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cell = (r["model"], f"W{r['wbits']}A{r['abits']}", r["calib_size"], r["iters"])
        cells.setdefault((*cell, r["recipe"]), []).append(r)
    rows = []
    for (model, setting, n, iters, recipe), reps in sorted(cells.items(), key=lambda kv: (kv[0][:4], kv[0][4] != PAPER)):
        test = [r["quant_top1"] for r in reps]
        std = statistics.stdev(test) if len(test) > 1 else 0.0
        base = cells.get((model, setting, n, iters, PAPER))
        diff, sig = "-", "-"
        if base and recipe != PAPER:
            btest = [r["quant_top1"] for r in base]
            d = statistics.mean(test) - statistics.mean(btest)
            bstd = statistics.stdev(btest) if len(btest) > 1 else 0.0
            diff, sig = f"{d:+.2f}", "yes" if abs(d) > 2 * max(std, bstd) else "no"
        rows.append({"model": model, "setting": setting, "calib_size": n, "iters": iters,
                     "variant": reps[0]["variant"], "recipe": recipe, "seeds": len(reps), "test_top1": mean_std(test),
                     "gap": mean_std([r["calib_top1"] - r["quant_top1"] for r in reps]), "vs_qdrop": diff,
                     "beyond_2std": sig, "seconds": round(statistics.mean(r["seconds"] for r in reps))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="bench/grid.py --out folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", default="", help="only these settings, e.g. W2A2")
    p.add_argument("--calib-sizes", default="", help="only these calibration sizes, e.g. 1024")
    a = p.parse_args()
    settings = set(filter(None, a.settings.upper().split(",")))
    sizes = {int(n) for n in filter(None, a.calib_sizes.split(","))}
    rows = rows_of(load_runs(a.folders, settings, sizes))
    if not rows:
        sys.exit("no finished runs in " + ", ".join(map(str, a.folders)))
    command = "python bench/recipe.py " + shlex.join(sys.argv[1:])
    legend = ("test_top1: top-1 (%) on the 10k test split, mean ± std over seeds; gap: calibration minus test top-1; "
              "vs_qdrop: test top-1 minus QDrop's with the paper's recipe (weight steps fixed; the same model, setting, "
              "images and iterations); "
              "beyond_2std: |vs_qdrop| > 2 x the larger std of the two; recipe: the method and its options as given to "
              "bench/grid.py (others at their defaults); seconds: wall time per run (one thread, shared machine).")
    a.out.mkdir(parents=True, exist_ok=True)
    write_results(a.out, command, rows, {}, legend)
    print((a.out / "results.md").read_text())


if __name__ == "__main__":
    main()
