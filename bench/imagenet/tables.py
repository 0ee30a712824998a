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
    (HERE / "results.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
