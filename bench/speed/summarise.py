"""Table of bench/speed/run.sh: metaaug's QDrop against the plain-PyTorch reference, per seed and mean.

    python bench/speed/summarise.py --runs bench/speed/runs --out bench/speed --seeds 0 --command "..."
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def seconds(path: Path) -> float:
    """A run's process wall time, written by run.sh in milliseconds."""
    return int(path.read_text()) / 1000


def row(runs: Path, seed: int) -> dict[str, Any]:
    """One seed's pair of runs, side by side."""
    m = json.loads((runs / f"metaaug-s{seed}" / "report.json").read_text())
    r = json.loads((runs / f"reference-s{seed}.json").read_text())
    return {"seed": seed, "setting": f"W{m['wbits']}A{m['abits']}", "calib_size": m["calib_size"], "iters": m["iters"],
            "fp_top1": m["fp_top1"], "metaaug_top1": m["quant_top1"], "reference_top1": r["quant_top1"],
            "metaaug_recon_s": m["recon_seconds"], "reference_recon_s": r["recon_seconds"],
            "ratio_recon": round(m["recon_seconds"] / r["recon_seconds"], 3),
            "metaaug_wall_s": round(seconds(runs / f"metaaug-s{seed}.wall_ms"), 1),
            "reference_wall_s": round(seconds(runs / f"reference-s{seed}.wall_ms"), 1),
            "metaaug_threads": m.get("threads"), "reference_threads": r.get("threads")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", required=True, help="comma or space separated")
    p.add_argument("--command", required=True, help="the command that made the runs (recorded)")
    p.add_argument("--alone", action="store_true", help="the runs were made one after the other (ALONE=1)")
    a = p.parse_args()
    rows = [row(a.runs, int(s)) for s in a.seeds.replace(",", " ").split()]
    if len(rows) > 1:
        mean = {k: round(statistics.mean(r[k] for r in rows), 3) for k in rows[0] if k.endswith(("_top1", "_s", "ratio_recon"))}
        rows.append({k: mean.get(k, "mean" if k == "seed" else rows[0][k]) for k in rows[0]})
    how = "One after the other, each alone on the machine" if a.alone else "Both runs of a seed at once"
    legend = (f"{how}, one thread each (OMP_NUM_THREADS=1), on the same stratified calibration images. "
              "metaaug: `python -m metaaug quantize --method qdrop --set lr_weight_scale=0` (the paper's QDrop, weight steps "
              "fixed), plus a `--set` per option in the command's SET. reference: bench/speed/reference.py, "
              "a plain-PyTorch loop of the same algorithm. *_recon_s: "
              "seconds in the per-block optimisation loops only (no caching, step searches or evaluation); ratio_recon: "
              "metaaug / reference; *_wall_s: the whole process (imports, data, both evaluations). *_top1: test top-1 (%) "
              "on Fashion-MNIST.")
    payload = {"command": a.command, "legend": legend, "summary": rows}
    (a.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    cols = list(rows[0])
    lines = [f"Command: `{a.command}`", "", legend, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
