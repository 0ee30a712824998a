"""Does reconstruction overfit a scarce calibration set? A verdict table and plot over a grid's runs.

Reads the runs of `bench/grid.py` result folders (e.g. QDrop at 10, 20, 30, 64 and 1024 calibration images) and
writes `<out>/results.md`, `<out>/results.json` and `<out>/overfit.png`. A cell counts as overfitting where test
top-1 is at least 1 point below the same method at 1024 images (mean over seeds) and the calibration-minus-test
gap is at least 3 points (issue #13's definition).

    python bench/overfit.py --out bench/overfit bench/overfit/resnet20_qdrop_w2a2 bench/overfit/resnet20_metaaug_w2a2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from tables import mean_std, write_results

FULL = 1024
BASELINE = "qdrop"
DROP, GAP = 1.0, 3.0


def parse_folder(text: str) -> tuple[Path, dict[str, str]]:
    """`FOLDER` (every variant) or `FOLDER:OLD=NEW,...` (only those variants, renamed; e.g. a recipe ablation's
    `wsconst` runs, which are today's default QDrop, as `qdrop`)."""
    folder, _, names = text.partition(":")
    return Path(folder), dict(item.split("=", 1) for item in filter(None, names.split(",")))


def load_runs(folders: list[str]) -> list[dict]:
    runs = []
    for folder, names in map(parse_folder, folders):
        for key, rep in json.loads((folder / "results.json").read_text())["runs"].items():
            variant = key.split("-")[1]
            if not names or variant in names:
                runs.append({**rep, "variant": names.get(variant, variant)})
    return runs


def verdicts(runs: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["model"], r["variant"], f"W{r['wbits']}A{r['abits']}", r["calib_size"]), []).append(r)
    rows = []
    for (model, variant, setting, n), reps in sorted(cells.items()):
        test = [r["quant_top1"] for r in reps]
        gap = [r["calib_top1"] - r["quant_top1"] for r in reps]
        full = cells.get((model, variant, setting, FULL)) or cells.get((model, BASELINE, setting, FULL))
        drop = statistics.mean(test) - statistics.mean(r["quant_top1"] for r in full) if full else None
        overfits = drop is not None and n != FULL and drop <= -DROP and statistics.mean(gap) >= GAP
        base = cells.get((model, BASELINE, setting, n)) if variant != BASELINE else None
        vs_base = statistics.mean(test) - statistics.mean(r["quant_top1"] for r in base) if base else None
        by_seed = {r["seed"]: r["quant_top1"] for r in base or []}
        paired = [f"{r['quant_top1'] - by_seed[r['seed']]:+.2f}" for r in sorted(reps, key=lambda r: r["seed"])
                  if r["seed"] in by_seed]
        rows.append({"model": model, "variant": variant, "setting": setting, "calib_size": n, "seeds": len(reps),
                     "test_top1": mean_std(test), "calib_top1": mean_std([r["calib_top1"] for r in reps]),
                     "gap": mean_std(gap), "vs_1024": "-" if drop is None or n == FULL else f"{drop:+.2f}",
                     "overfits": "yes" if overfits else "no",
                     "vs_qdrop": "-" if vs_base is None else f"{vs_base:+.2f}",
                     "vs_qdrop_by_seed": " / ".join(paired) or "-",
                     "_test": statistics.mean(test), "_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                     "_gap": statistics.mean(gap)})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """One column per (model, setting), test top-1 above the gap; a variant keeps its colour in every column, so the
    figure stays readable with a dozen variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["setting"]) for r in rows})
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "qdrop", v))
    style = {v: {"color": plt.get_cmap("tab20")(i % 20), "lw": 2 if v == "qdrop" else 1, "marker": "o"}
             for i, v in enumerate(variants)}
    series: dict[tuple, list] = {}
    for r in sorted(rows, key=lambda r: r["calib_size"]):
        series.setdefault((r["model"], r["setting"], r["variant"]), []).append(r)
    fig, axes = plt.subplots(2, len(panels), figsize=(3.4 * len(panels), 6.5), squeeze=False, sharex=True)
    for col, (model, setting) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        for v in variants:
            if pts := series.get((model, setting, v)):
                xs = [p["calib_size"] for p in pts]
                top.errorbar(xs, [p["_test"] for p in pts], yerr=[p["_std"] for p in pts], ms=4, capsize=3, **style[v])
                bottom.plot(xs, [p["_gap"] for p in pts], ms=4, **style[v])
        top.set_title(f"{model} {setting}", fontsize=9)
        bottom.axhline(GAP, color="grey", ls="--", lw=1)
        bottom.set_xlabel("calibration images")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[1][0].set_ylabel("calibration - test top-1 (points)")
    handles = [plt.Line2D([], [], **style[v]) for v in variants]
    fig.legend(handles, variants, loc="lower center", ncol=min(len(variants), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(variants) - 1) // 7), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="bench/grid.py --out folders, each optionally FOLDER:OLD=NEW,... "
                   "(only those variants, renamed)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    rows = verdicts(load_runs(a.folders))
    if not rows:
        sys.exit("no finished runs in " + ", ".join(map(str, a.folders)))
    command = "python bench/overfit.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    a.out.mkdir(parents=True, exist_ok=True)
    legend = (f"test_top1 / calib_top1: top-1 (%) on the 10k test split / on the calibration images, mean ± std over "
              f"seeds; gap: calib - test; vs_1024: test top-1 minus the same variant at {FULL} images (QDrop's where the "
              f"variant has no {FULL}-image run); overfits: vs_1024 <= -{DROP} and mean gap >= {GAP}; vs_qdrop: test "
              f"top-1 minus QDrop's at the same calibration size; vs_qdrop_by_seed: the same, seed by seed (a seed draws the "
              f"same calibration images for every method).")
    write_results(a.out, command, public, {}, legend)
    plot(rows, a.out / "overfit.png")
    print((a.out / "results.md").read_text())


if __name__ == "__main__":
    main()
