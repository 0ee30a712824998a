"""`metaaug search`: MetaQuantNet + genetic search for per-layer bit-widths under a budget; writes policy.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metaaug.cli.common import app, console, friendly, out_console, parse_ints
from metaaug.cli.progress import RichPhases
from metaaug.errors import ConfigError

SPEC = "; or a uniform policy's: W3A3, 1.1xW2"


@app.command()
@friendly
def search(
    model: Annotated[str, typer.Option(help="bundled name or path/to/file.py:factory")] = "resnet20",
    weights: Annotated[str | None, typer.Option(help="weights for --model")] = None,
    wbits_choices: Annotated[str, typer.Option(help="weight bit-widths to search, e.g. 2,3,4,8")] = "2,3,4,8",
    abits_choices: Annotated[str | None, typer.Option(help="activation bit-widths to search (default: weights only, at --abits)")] = None,
    abits: Annotated[int, typer.Option(help="activation bits when they are not searched")] = 4,
    avg_wbits: Annotated[str | None, typer.Option(help=f"budget: average weight bits (parameter-weighted){SPEC}")] = None,
    weight_kb: Annotated[str | None, typer.Option(help=f"budget: weight memory in KB (packed-format accounting){SPEC}")] = None,
    weight_vs_w8: Annotated[str | None, typer.Option(help=f"budget: weight memory as a fraction of uniform W8{SPEC}")] = None,
    bops_vs_w8a8: Annotated[str | None, typer.Option(help=f"budget: BOPs as a fraction of uniform W8A8{SPEC}")] = None,
    bops: Annotated[str | None, typer.Option(help=f"budget: BOPs (MACs x wbits x abits) per image{SPEC}")] = None,
    generations: Annotated[int, typer.Option(help="GA generations")] = 20,
    population: Annotated[int, typer.Option(help="GA population")] = 50,
    meta_steps: Annotated[int, typer.Option(help="MetaQuantNet training steps (0 = the round-to-nearest proxy)")] = 1000,
    calib_size: Annotated[int, typer.Option(help="calibration images (a --holdout share scores the candidates)")] = 1024,
    meta_images: Annotated[int, typer.Option(help="extra unlabeled train images for MetaQuantNet (0: calibration images only)")] = 0,
    holdout: Annotated[float, typer.Option(help="fraction of the calibration images held out for fitness")] = 0.2,
    fitness: Annotated[str, typer.Option(help="kl (label-free) | top1")] = "kl",
    strategy: Annotated[str, typer.Option(help="ga | random (same proxy and evaluations) | sensitivity (Fisher x error knapsack)")] = "ga",
    evaluations: Annotated[int | None, typer.Option(help="random search: candidates to score (default population x generations)")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="score candidates as Ray tasks (pip install 'metaaug[ray]')")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: Annotated[str | None, typer.Option()] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out: Annotated[Path | None, typer.Option(help="run folder for policy.json, search.json, plots (resumable; default runs/search)")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="start the run folder over (its progress and results are deleted)")] = False,
) -> None:
    """Train MetaQuantNet once, search per-layer bits with a genetic algorithm under one budget, write policy.json.
    Finish the policy with `metaaug quantize --policy DIR/policy.json`."""
    from metaaug.search import GAConfig, MetaQuantConfig, SearchConfig, run_search
    from metaaug.search.job import check_ray_address
    from metaaug.search.space import cost_value

    budgets = {k: v for k, v in {"avg_wbits": avg_wbits, "weight_kb": weight_kb, "weight_vs_w8": weight_vs_w8,
                                 "bops_vs_w8a8": bops_vs_w8a8, "bops": bops}.items() if v is not None}
    if len(budgets) != 1:
        raise ConfigError("give exactly one budget: --avg-wbits, --weight-kb, --weight-vs-w8, --bops or --bops-vs-w8a8")
    (kind, limit), = budgets.items()
    if meta_steps < 0:
        raise ConfigError(f"--meta-steps must be >= 0, got {meta_steps}")
    cfg = SearchConfig(model=model, weights=weights, wbits_choices=parse_ints(wbits_choices, "--wbits-choices"),
                       abits_choices=parse_ints(abits_choices, "--abits-choices"), abits=abits, budget_kind=kind, budget=limit,
                       calib_size=calib_size, holdout=holdout, seed=seed, data_dir=data_dir, fitness=fitness,
                       strategy=strategy, evaluations=evaluations, meta_images=meta_images,
                       proxy="metaquant" if meta_steps > 0 else "rtn", meta=MetaQuantConfig(steps=meta_steps),
                       ga=GAConfig(population=population, generations=generations))
    if ray or ray_address is not None:
        check_ray_address(ray_address)  # before MetaQuantNet training, not after it
    out = out or Path("runs/search")
    with RichPhases(console) as prog:
        summary = run_search(cfg, out, device, prog, ray=ray or ray_address is not None, ray_address=ray_address,
                             restart=restart)
    best = summary["best"]
    limit = summary["budget"]["limit"]
    named = "" if limit == cfg.budget else f" ({cfg.budget})"
    out_console.print(f"policy: {out / 'policy.json'}  ({kind} {cost_value(kind, best['cost']):g} "
                      f"<= {limit:g}{named}, avg weight bits {best['cost']['avg_wbits']:.3f}, held-out top-1 {best['top1']:.2f}, "
                      f"KL {best['kl']:.4f})")
    for name, u in summary["uniform"].items():
        out_console.print(f"  uniform {name}: avg bits {u['cost']['avg_wbits']:.3f}, top-1 {u['top1']:.2f}, KL {u['kl']:.4f}"
                          f"{'' if u['fits_budget'] else '  (over budget)'}")
    out_console.print(f"seconds: {summary['seconds']}; next: metaaug quantize --policy {out / 'policy.json'} --method qdrop")
