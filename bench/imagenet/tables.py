"""bench/imagenet/memory.jsonl (one line per `memory.sh` run) -> bench/imagenet/results.md."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "memory.jsonl").read_text().splitlines() if line.strip()]
    out = ["# ImageNet-sized CNNs at 224x224: peak memory and time of QDrop (issue #32)", "",
           "Each row is one `bash bench/imagenet/memory.sh LABEL MODEL CALIB ITERS [args]` run on this machine (2 CPU "
           "cores, 24 GB), peak RSS from `/usr/bin/time -v`. Random weights (the accuracy means nothing; memory and "
           "time depend on shapes only); images are Fashion-MNIST upsampled to RGB 224x224 by make_data.py.", "",
           "| run | code | calib | iters/unit | peak RSS GB | wall s | caches | cache peak in memory | on disk | budget | slowest unit ms/iter |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("cache") or {}
        slow = max(r["units"], key=lambda u: u["ms_per_iter"]) if r["units"] else {"unit": "-", "ms_per_iter": 0}
        out.append(f"| {r['label']} | {r['code']} | {r['calib_size']} | {r['iters']} | {r['peak_rss_gb']} | {r['wall_s']} | "
                   f"{c.get('where', 'n/a')} ({c.get('dtype', 'float32')}) | {c.get('peak_memory', 'n/a')} | "
                   f"{c.get('peak_disk', 'n/a')} | {c.get('budget', 'n/a')} | {slow['unit']} {slow['ms_per_iter']} |")
    out += ["", "Commands:", ""] + [f"- `{r['label']}`: `{r['command']}`" for r in rows]
    out += released_table(rows)
    (HERE / "results.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


def released_table(rows: list[dict]) -> list[str]:
    """ms/iteration per unit against the released QDrop code (released_qdrop.json) on the same shapes, if measured."""
    path = HERE / "released_qdrop.json"
    ours = [r for r in rows if "released-recipe" in r["label"]]
    if not path.exists() or not ours:
        return []
    ref, mine = json.loads(path.read_text()), {u["unit"]: u["ms_per_iter"] for u in ours[-1]["units"]}
    out = ["", "## ResNet-18 units against the released QDrop loop", "",
           f"Released: `bash bench/imagenet/released_qdrop.sh {ref['calib_size']} {ref['iters'][0]},{ref['iters'][1]}` "
           "(github.com/wimh966/QDrop in its own venv under /tmp; ms/iteration = the difference of the wall times of "
           "its `reconstruction()` at the two iteration counts over their difference). metaaug: the engine's ms/iteration "
           f"of run `{ours[-1]['label']}` (mean over its {ours[-1]['iters']} iterations, the first included). Both W4A4, "
           f"batch 32, QDrop p=0.5, weight steps fixed, {ref['calib_size']} images, one thread each, run one after "
           "the other on this machine.", "",
           "| unit | released QDrop ms/iter | metaaug ms/iter | metaaug / released |", "|---|---|---|---|"]
    for u in ref["units"]:
        m = mine.get(u["unit"])
        ratio = f"{m / u['ms_per_iter']:.2f}" if m else "-"
        out.append(f"| {u['unit']} | {u['ms_per_iter']} | {m if m else '-'} | {ratio} |")
    return out


if __name__ == "__main__":
    main()
