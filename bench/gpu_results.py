"""bench/gpu/results.md from what bench/gpu.sh left in its folder: each table only for the steps that finished.

    python bench/gpu_results.py bench/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.etree import ElementTree


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def steady(unit: dict) -> float:
    """ms per iteration without the first one (which pays cuDNN's algorithm search, or a compile)."""
    return unit["extra"].get("steady_ms_per_iter", unit["ms_per_iter"])


def resnet18_table(folder: Path) -> list[str]:
    runs = {k: load(folder, k) for k in ("resnet18", "resnet18_bf16", "resnet18_fast")}
    base = runs["resnet18"]
    if base is None:
        return []
    labels = {"resnet18": "float32", "resnet18_bf16": "bf16", "resnet18_fast": "--fast (bf16 + compile)"}
    have = [k for k, r in runs.items() if r is not None]
    out = [f"## ResNet-18 at 224x224, QDrop W4A4, {base['calib_images']} images, {base['iters']} iterations per unit",
           "", "Random weights (bench/imagenet/make_data.py): times only. Steady ms/iteration (the first iteration apart: "
           "it pays cuDNN's algorithm search or the compile); first iteration in brackets.", "",
           "| unit | " + " | ".join(labels[k] for k in have) + " |", "|---" * (len(have) + 1) + "|"]
    for i, u in enumerate(base["units"]):
        cells = []
        for k in have:
            v = runs[k]["units"][i]
            ratio = "" if k == "resnet18" else f", {steady(v) / steady(u):.2f}x"
            cells.append(f"{steady(v):.2f} ({v['extra'].get('first_iter_ms', 0):.0f}{ratio})")
        out.append(f"| {u['name']} | " + " | ".join(cells) + " |")
    out.append("| total recon s | " + " | ".join(f"{runs[k]['recon_seconds']}" for k in have) + " |")
    return [*out, ""]


def main() -> None:
    folder = Path(sys.argv[1])
    env = dict(line.split(maxsplit=1) for line in (folder / "env.txt").read_text().splitlines() if " " in line or "\t" in line)
    steps = [line.split("\t") for line in (folder / "steps.tsv").read_text().splitlines()]
    out = [f"# GPU check: {env.get('gpu', '?')}", "",
           f"torch {env.get('torch', '?')}; {env.get('nvidia-smi', '')}. Command: `{env.get('command', '').strip()}` "
           f"({env.get('total', '?').strip()} s in all).", "", "| step | result | s |", "|---|---|---|"]
    out += [f"| {n} | {r} | {s} |" for n, r, s in steps] + [""]
    tests = folder / "cuda_tests.xml"
    if tests.exists():
        suite = ElementTree.parse(tests).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        out += [f"CUDA tests (tests/test_cuda.py): {total - failed - errors - skipped} passed, {failed} failed, {errors} errors, "
                f"{skipped} skipped in {float(suite.get('time', 0)):.0f} s.", ""]
        bad = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
        out += [*(f"- failed: {name}" for name in bad), ""] if bad else []
    r20 = load(folder, "resnet20")
    if r20 is not None:
        ms = [steady(u) for u in r20["units"]]
        out += [f"## Bundled ResNet-20, QDrop W{r20['wbits']}A{r20['abits']}, {r20['calib_images']} images, "
                f"{r20['iters']} iterations, seed {r20['seed']}", "",
                "| FP top-1 | quantized top-1 | recon s | total s | mean steady ms/iter per unit |", "|---|---|---|---|---|",
                f"| {r20['fp_top1']} | {r20['quant_top1']} | {r20['recon_seconds']} | {r20['seconds']} | {sum(ms) / len(ms):.2f} |", ""]
    out += resnet18_table(folder)
    ref, ours = load(folder, "reference"), load(folder, "metaaug_ref")
    if ref is not None and ours is not None:
        out += [f"## metaaug QDrop against the plain reference loop on the GPU (ResNet-20 W2A4, {ref['iters']} iterations)", "",
                "One after the other; metaaug with the reference's recipe (`--set lr_weight_scale=0`).", "",
                "| | recon s | top-1 |", "|---|---|---|",
                f"| reference (bench/speed/reference.py) | {ref['recon_seconds']} | {ref['quant_top1']} |",
                f"| metaaug | {ours['recon_seconds']} | {ours['quant_top1']} |",
                f"| ratio | {ours['recon_seconds'] / ref['recon_seconds']:.2f} | |", ""]
    (folder / "results.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
