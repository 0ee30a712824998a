"""Bitwidth-adaptive QAT benchmark: MEBQAT (as released, and first-order MAML; quantizers per width or shared)
against joint training of every width each step (Any-Precision style) and dedicated LSQ QAT per width, at equal
training compute (forward+backward passes over the batch), and against the PTQ baseline (QDrop 2000 iterations,
read from bench/baselines/results.json).

    python bench/qat.py --out bench/qat --model resnet20 --bits 2,3,4,8 --steps 300 --seeds 0

Compute: MEBQAT's step is 1 + tasks passes (FP plus its quantized tasks); joint's is 1 + widths, so it gets
steps x (1 + tasks) / (1 + widths); each dedicated model gets `steps` x (1 + tasks) / widths one-pass steps.
Run folders resume (bench/qat/runs/...).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import metaaug  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split

from metaaug.qat import QATConfig
from metaaug.qat.job import QATJob, run_qat
from tables import mean_std, write_results

ARMS = {
    "mebqat": {},
    "mebqat-shared": {"share_quantizers": True},
    "mebqat-maml": {"method": "mebqat-maml"},
    "joint": {"method": "joint"},
    "dedicated": {"method": "dedicated"},
}
ABLATIONS = ("mebqat-shared", "mebqat-maml")


PTQ = (("QDrop, paper recipe", "baselines*", "qdrop"),
       ("QDrop, learned weight steps (default)", "recipe/*_i2000", "wsconst"))


def ptq_reference(model: str) -> list[dict]:
    """QDrop at 2000 iterations and 1024 images, per recipe and setting, from the committed grid folders."""
    rows = []
    for label, folders, variant in PTQ:
        cells = {}
        for path in sorted(Path(__file__).parent.glob(f"{folders}/results.json")):
            for r in json.loads(path.read_text())["summary"]:
                if r["model"] == model and r["variant"] == variant and r["calib_size"] == 1024:
                    cells[f"w{r['setting'][1]}a{r['setting'][3]}"] = (r["quant_top1"], r["seeds"])
        if cells:
            rows.append({"arm": f"PTQ: {label}, 2000 iters, 1024 images (bench/{folders})",
                         "seeds": "/".join(sorted({str(n) for _, n in cells.values()})),
                         **{k: v for k, (v, _) in cells.items()}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--steps", type=int, default=300, help="MEBQAT optimiser steps; the others get equal compute")
    p.add_argument("--seeds", default="0")
    p.add_argument("--ablation-seeds", default="0",
                   help=f"seeds for the ablation arms ({', '.join(ABLATIONS)}); the compared arms use --seeds")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--quant-lr", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads-note", default="seed 0 on 2 threads, later seeds on 1 thread beside another job",
                   help="how the runs shared the machine, for the table's legend (train_s depends on it)")
    a = p.parse_args()
    command = "python bench/qat.py " + shlex.join(sys.argv[1:])
    bits = tuple(int(b) for b in a.bits.split(","))
    base = QATConfig(bits=bits, steps=a.steps, epochs=100)
    base = replace(base, **{k: v for k, v in (("lr", a.lr), ("quant_lr", a.quant_lr)) if v is not None})
    passes = a.steps * (1 + min(base.tasks, len(bits)))
    rows, reports = [], {}
    names = ["fp", *(f"w{b}a{b}" for b in bits)]
    unseen = ["w5a5", "w6a6"]
    for arm in a.arms.split(","):
        per_seed: dict[str, list[float]] = {}
        seconds = []
        for seed in (int(s) for s in (a.ablation_seeds if arm in ABLATIONS else a.seeds).split(",")):
            if arm == "dedicated":
                cfgs = [replace(base, method="dedicated", bits=(b,), steps=passes // len(bits)) for b in bits]
            else:
                cfg = replace(base, **ARMS[arm])
                if arm == "joint":
                    cfg = replace(cfg, steps=passes // (1 + len(bits)))
                cfgs = [cfg]
            got: dict[str, float] = {}
            secs = 0.0
            for cfg in cfgs:
                tag = arm if arm != "dedicated" else f"dedicated-w{cfg.bits[0]}"
                out = a.out / "runs" / f"{a.model}-{tag}-s{seed}"
                print(f"[{tag} seed {seed}] {cfg.steps} steps", flush=True)
                rep = run_qat(QATJob(model=a.model, seed=seed, qat=cfg), out, a.device, command=command)
                reports[f"{tag}-s{seed}"] = {k: v for k, v in rep.items() if k != "history"}
                for k, v in {**rep["top1"], **rep.get("unseen_top1", {})}.items():
                    if arm != "dedicated" or k != "fp":
                        got[k] = v
                secs += rep["train_seconds"]
            for k, v in got.items():
                per_seed.setdefault(k, []).append(v)
            seconds.append(secs)
        row = {"arm": arm, "seeds": len(seconds)}
        row.update({n: mean_std(per_seed[n]) if n in per_seed else "-" for n in [*names, *unseen]})
        row["train_s"] = round(sum(seconds) / len(seconds))
        rows.append(row)
    for ref in ptq_reference(a.model):
        rows.append({"arm": ref["arm"], "seeds": ref["seeds"], **{n: ref.get(n, "-") for n in [*names, *unseen]},
                     "train_s": "-"})
    legend = (f"{a.model} on Fashion-MNIST, test top-1 (%) on the 10k test split per width (W=A; first and last layers "
              f"8-bit), BatchNorm statistics re-estimated per width on 1024 train images. MEBQAT: {a.steps} steps of "
              f"batch {base.batch}, FP + {base.tasks} sampled widths per step (lowest and highest forced); every arm gets "
              f"{passes} forward+backward passes of the batch in all (dedicated: summed over its {len(bits)} models). "
              "w5a5/w6a6 were never trained (quantizers interpolated between neighbours). train_s: training wall time "
              f"(2-core machine; {a.threads_note}).")
    write_results(a.out, command, rows, {"runs": reports}, legend)
    print((a.out / "results.md").read_text())


if __name__ == "__main__":
    main()
