"""Speed options of the reconstruction loop, each on and off (issue #32): per-unit ms/iteration of QDrop on a bundled
model, and the activation fake-quant alone in eager mode against `torch.compile`.

    OMP_NUM_THREADS=1 python bench/speed/options.py --out bench/speed/options --iters 200 --rounds 2
    OMP_NUM_THREADS=2 python bench/speed/options.py --out bench/speed/options3 --seeds 0,1,2 --no-fake-quant

Part "unit": `metaaug quantize --method qdrop` on a bundled model (W2A4, `--calib` calibration images) once per
variant (`--set` options) and seed, the variants interleaved over `--rounds` rounds (and seeds) so that load on the
machine falls on all of them alike; ms/iteration per unit is the engine's steady-state figure (`report.json` units,
first iteration, where compiling happens, left out), summed over units, the minimum over runs; top-1 is on the full
Fashion-MNIST test split, per seed (mean ± std over seeds). Part "fake-quant": the fused activation quantizer
(`metaaug.quant.grids._GridFakeQuant`, A4, a QDrop p=0.5 mask drawn once, forward + backward) on each activation
shape of that model at batch 32, eager against `torch.compile(dynamic=False)` of the same function (best of 30 after
warm-up; compile seconds are the first call's), with a bit-identity check of output and gradients.
"""

from __future__ import annotations

import metaaug  # noqa: F401  (first: the CLI's OpenMP wait policy)

# isort: split

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from metaaug.quant.grids import _GridFakeQuant, act_bounds, keep_mask

VARIANTS = {"float32": [], "bf16_autocast": ["--set", "compute_dtype=bfloat16"],
            "compiled_fake_quant": ["--set", "compile_fake_quant=true"],
            "bf16_and_compiled": ["--set", "compute_dtype=bfloat16", "--set", "compile_fake_quant=true"]}
SHAPES = [(32, 16, 28, 28), (32, 32, 14, 14), (32, 64, 7, 7)]


def unit_times(args: list[str], model: str, seed: int, iters: int, calib: int, work: Path) -> dict[str, Any]:
    """One QDrop run of a bundled model with `args`; per-unit steady ms/iteration and top-1 from its report."""
    out = work / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "metaaug", "quantize", "--model", model, "--method", "qdrop", "--wbits", "2",
           "--abits", "4", "--calib-size", str(calib), "--iters", str(iters), "--seed", str(seed), "--device", "cpu",
           "--out", str(out), *args]
    subprocess.run(cmd, check=True, capture_output=True)
    rep = json.loads((out / "report.json").read_text())
    units = {u["name"]: u["extra"].get("steady_ms_per_iter", u["ms_per_iter"]) for u in rep["units"] if u["iters"]}
    return {"seed": seed, "units": units, "sum_ms": round(sum(units.values()), 1), "top1": rep["quant_top1"]}


def step(fn, x0: torch.Tensor, s0: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    out = fn(x, s)
    out.backward(g)
    return out.detach(), x.grad, s.grad


def fake_quant_times(reps: int = 30) -> list[dict[str, Any]]:
    """Eager vs compiled fused fake-quant per shape."""
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        x0, s0, g = torch.randn(shape).relu() * 3, torch.tensor(0.2), torch.randn(shape)
        mask = keep_mask(x0.shape, 0.5, x0.device)

        def eager(x: torch.Tensor, s: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            return _GridFakeQuant.apply(x, s, mask, "uniform", *act_bounds(4, False))

        compiled = torch.compile(eager, dynamic=False)
        t = time.perf_counter()
        ref = step(compiled, x0, s0, g)
        compile_s = time.perf_counter() - t
        base = step(eager, x0, s0, g)
        differ = (base[0] != ref[0]).float().mean().item()
        row: dict[str, Any] = {"shape": list(shape), "compile_s": round(compile_s, 1),
                               "identical": all(torch.equal(a, b) for a, b in zip(base, ref, strict=True)),
                               "outputs_differing": f"{differ:.2e}",
                               "step_grad_rel_diff": f"{abs(base[2] - ref[2]).item() / abs(base[2]).item():.1e}"}
        for name, fn in (("eager", eager), ("compiled", compiled)):
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                step(fn, x0, s0, g)
                times.append(time.perf_counter() - t)
            row[f"{name}_ms"] = round(min(times) * 1e3, 2)
        rows.append(row)
    return rows


def write(out: Path, payload: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"Command: `{payload['command']}`", "", __doc__.split("\n\n", 2)[2].strip(), "",
             f"Model: {payload['model']}; threads: {payload['threads']}; torch {payload['torch']}.", "",
             "| variant | sum of unit ms/iter | vs float32 | top-1 per seed | top-1 mean ± std | "
             + " | ".join(payload["unit_names"]) + " |", "|" + "---|" * (5 + len(payload["unit_names"]))]
    base = payload["unit"]["float32"]["sum_ms"]
    for name, r in payload["unit"].items():
        lines.append(f"| {name} | {r['sum_ms']} | {r['sum_ms'] / base:.3f} | {' / '.join(map(str, r['top1']))} | "
                     f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f} | "
                     + " | ".join(str(r["units"].get(u, "-")) for u in payload["unit_names"]) + " |")
    if not payload["fake_quant"]:
        (out / "results.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    lines += ["", "| shape | eager ms | compiled ms | compiled / eager | compile s | identical | outputs differing | step grad rel. diff |",
              "|---|---|---|---|---|---|---|---|"]
    for r in payload["fake_quant"]:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['eager_ms']} | {r['compiled_ms']} | "
                     f"{r['compiled_ms'] / r['eager_ms']:.2f} | {r['compile_s']} | {r['identical']} | "
                     f"{r['outputs_differing']} | {r['step_grad_rel_diff']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each a run per variant")
    p.add_argument("--no-fake-quant", action="store_true", help="skip the fake-quant part")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds = [int(x) for x in a.seeds.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(a.rounds):
            for seed in seeds:
                for name, args in VARIANTS.items():
                    runs[name].append(unit_times(args, a.model, seed, a.iters, a.calib, Path(work)))
    unit = {}
    for name, rs in runs.items():
        best = {u: min(r["units"][u] for r in rs) for u in rs[0]["units"]}
        top1 = [r["top1"] for r in rs[: len(seeds)]]
        t = torch.tensor(top1, dtype=torch.float64)
        unit[name] = {"units": {u: round(v, 1) for u, v in best.items()}, "sum_ms": round(sum(best.values()), 1),
                      "top1": top1, "top1_mean": t.mean().item(), "top1_std": t.std().item() if len(top1) > 1 else 0.0,
                      "runs": rs}
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} python bench/speed/options.py --out {a.out} "
               f"--model {a.model} --iters {a.iters} --calib {a.calib} --rounds {a.rounds} --seeds {a.seeds}"
               + (" --no-fake-quant" if a.no_fake_quant else ""))
    write(a.out, {"command": command, "model": a.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "unit_names": list(unit["float32"]["units"]), "unit": unit,
                  "fake_quant": [] if a.no_fake_quant else fake_quant_times()})


if __name__ == "__main__":
    main()
