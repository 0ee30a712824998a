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
    out += option_tables(rows)
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


VARIANTS = {"before": "before #32 (c7963f4^)", "float32": "float32 (default)", "bf16": "compute_dtype=bfloat16",
            "compiled": "compile_fake_quant", "both": "bf16 + compiled"}


def option_tables(rows: list[dict]) -> list[str]:
    """A table per model from `options.sh` runs (labels opt-MODEL-VARIANT): each speed option on and off."""
    runs: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["label"].startswith("opt-"):
            model, variant = r["label"][4:].rsplit("-", 1)
            runs.setdefault(model, {})[variant] = r  # a later run of the same label replaces an earlier one
    if not runs:
        return []
    out = ["", "## Speed options per model", "",
           "`bash bench/imagenet/options.sh CALIB ITERS MODEL...` (BEFORE=1 adds the code before this issue's work): "
           "one run per variant, one after the other, torch's default threads (2 on this machine). ms/iteration is the engine's steady state "
           "per unit (the first iteration, which pays torch.compile's compile, left out; the before code reports the plain mean)."]
    for model, by in runs.items():
        vs = [v for v in VARIANTS if v in by]
        ref = by.get("float32")
        first = next(iter(by.values()))
        out += ["", f"### {model} ({first['calib_size']} images, {first['iters']} iterations per unit)", "",
                "| | " + " | ".join(VARIANTS[v] for v in vs) + " |", "|---|" + "---|" * len(vs),
                "| peak RSS GB | " + " | ".join(str(by[v]["peak_rss_gb"]) for v in vs) + " |",
                "| wall s | " + " | ".join(str(by[v]["wall_s"]) for v in vs) + " |"]
        per = {v: {u["unit"]: u.get("steady_ms_per_iter") or u["ms_per_iter"] for u in by[v]["units"]} for v in vs}
        sums = {v: sum(per[v].values()) for v in vs}
        base = sums.get("float32")
        out.append("| sum of unit ms/iter | " + " | ".join(
            f"{sums[v]:.0f}" + (f" ({sums[v] / base:.2f}x)" if base else "") for v in vs) + " |")
        for u in (ref or first)["units"]:
            out.append(f"| {u['unit']} | " + " | ".join(f"{per[v].get(u['unit'], 0):.1f}" for v in vs) + " |")
    return out


if __name__ == "__main__":
    main()
