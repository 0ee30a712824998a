"""Few-shot MEBQAT benchmark: classes 0-5 seen, 6-9 unseen (fixed). An FP model is trained on the seen classes only
(the bundled checkpoint saw all ten, which would leak the unseen ones), MEBQAT meta-trains it on the seen classes
with bit-width tasks, then N-way K-shot episodes on the unseen classes' test images run at each width with
prototype and Proto-MAML heads (mean accuracy, 95% interval).

    python bench/fewshot.py --out bench/qat/fewshot --steps 200 --episodes 600

Every step resumes from its files (weights, run folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import metaaug  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split

from metaaug.qat import QATConfig
from metaaug.qat.fewshot import EpisodeConfig, run_fewshot
from metaaug.qat.job import QATJob, run_qat
from metaaug.train import train
from tables import write_results

SEEN = (0, 1, 2, 3, 4, 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--fp-epochs", type=int, default=15)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--ways", type=int, default=4)
    a = p.parse_args()
    command = "python bench/fewshot.py " + shlex.join(sys.argv[1:])
    weights = a.out / "weights" / f"{a.model}_fmnist_classes{''.join(map(str, SEEN))}.safetensors"
    if not weights.exists():
        train(a.model, a.fp_epochs, 128, 0.2, 5e-4, 0, weights.parent, SEEN)
    card = json.loads(weights.with_suffix(".json").read_text())
    bits = tuple(int(b) for b in a.bits.split(","))
    job = QATJob(model=a.model, weights=str(weights), qat=QATConfig(bits=bits, steps=a.steps, classes=SEEN))
    report = run_qat(job, a.out / "run", command=command)
    res = run_fewshot(a.out / "run", [None, *bits], EpisodeConfig(ways=a.ways, episodes=a.episodes), a.out / "fewshot.json")
    rows = []
    for (shots, head) in sorted({(r["shots"], r["head"]) for r in res["results"]}):
        row = {"K": shots, "head": head}
        for r in res["results"]:
            if r["shots"] == shots and r["head"] == head:
                row[r["width"]] = f"{r['mean']:.2f} ± {r['ci95']:.2f}"
        rows.append(row)
    legend = (f"{a.ways}-way K-shot episodes ({a.episodes} per cell, 15 queries per class) on the unseen classes "
              f"{res['unseen_classes']} of the test split; mean accuracy ± 95% interval. Backbone: {a.model} trained "
              f"in FP on classes {list(SEEN)} only ({card['epochs']} epochs, seen-class test top-1 {card['test_top1']}), "
              f"then MEBQAT on the seen classes ({a.steps} steps; seen-class test top-1 per width: "
              + ", ".join(f"{k} {v}" for k, v in report["top1"].items()) + "). Features: the last layer's input. "
              "proto: nearest prototype (squared Euclidean); maml: Proto-MAML linear head, 5 SGD steps at lr 0.01 on "
              "the support set. The same episodes for every width.")
    write_results(a.out, command, rows, {"fewshot": res, "qat_report": {k: v for k, v in report.items() if k != "history"},
                                         "fp_card": card}, legend)
    print((a.out / "results.md").read_text())


if __name__ == "__main__":
    main()
