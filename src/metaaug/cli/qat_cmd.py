"""`metaaug qat` (train one model for many bit-widths) and `metaaug fewshot` (N-way K-shot episodes per width)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from metaaug.cli.common import app, console, friendly, out_console
from metaaug.cli.common import parse_ints as parse_bits
from metaaug.errors import ConfigError
from metaaug.qat.config import QAT_METHODS


@app.command()
@friendly
def qat(
    model: Annotated[str, typer.Option(help="bundled name or path/to/file.py:factory")] = "resnet20",
    weights: Annotated[str | None, typer.Option(help="FP weights to start from (default: the bundled checkpoint)")] = None,
    method: Annotated[str, typer.Option(help=" | ".join(QAT_METHODS))] = "mebqat",
    bits: Annotated[str, typer.Option(help="candidate widths, W=A pairs (e.g. 2,3,4,8)")] = "2,3,4,8",
    abits: Annotated[str | None, typer.Option(help="independent activation widths (then every W x A pair is a candidate)")] = None,
    epochs: Annotated[int, typer.Option(help="epochs over the train split")] = 2,
    steps: Annotated[int | None, typer.Option(help="cap on optimiser steps (quick runs)")] = None,
    tasks: Annotated[int, typer.Option(help="mebqat: quantized widths per step (lowest and highest always)")] = 3,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the weights (cosine decay)")] = 1e-4,
    batch: Annotated[int, typer.Option()] = 128,
    share_quantizers: Annotated[bool, typer.Option(help="one learned clipping range per quantizer for all widths")] = False,
    classes: Annotated[str | None, typer.Option(help="train on these classes only (few-shot meta-training), e.g. 0,1,2,3,4,5")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: Annotated[str | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>-qat-<method>-s<seed>)")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="start the run folder over (its progress and results are deleted)")] = False,
) -> None:
    """Quantization-aware training of one model for several bit-widths; resumable; report.json + accuracy.png."""
    from metaaug.cli.progress import RichPhases
    from metaaug.qat.config import QATConfig
    from metaaug.qat.job import QATJob, run_qat

    cfg = QATConfig(method=method, bits=parse_bits(bits, "--bits"), abits=parse_bits(abits, "--abits"), epochs=epochs,
                    steps=steps, tasks=tasks, lr=lr, batch=batch, share_quantizers=share_quantizers,
                    classes=parse_bits(classes, "--classes"))
    job = QATJob(model=model, weights=weights, data_dir=data_dir, seed=seed, qat=cfg)
    out = out or Path("runs") / f"{Path(model.split(':')[0]).stem}-qat-{method}-s{seed}"
    with RichPhases(console) as prog:
        report = run_qat(job, out, device, prog, command="metaaug " + shlex.join(sys.argv[1:]), restart=restart)
    table = Table(title=f"{model} {method}: test top-1 per width ({report['test_images']} images)")
    for col in ("width", "top1", "kind"):
        table.add_column(col)
    for name, acc in report["top1"].items():
        table.add_row(name, f"{acc:.2f}", "trained" if name != "fp" else "full precision")
    for name, acc in report["unseen_top1"].items():
        table.add_row(name, f"{acc:.2f}", "unseen (interpolated quantizers)")
    out_console.print(table)
    out_console.print(f"FP before QAT {report['fp_top1_before']:.2f}; {report['steps']} steps in {report['train_seconds']:.0f} s; "
                      f"run folder: {out}")


@app.command()
@friendly
def fewshot(
    run: Annotated[Path, typer.Option(help="QAT run folder meta-trained on seen classes (`metaaug qat --classes ...`)")],
    bits: Annotated[str, typer.Option(help="widths to test (W=A), 'fp' for full precision")] = "fp,2,4,8",
    ways: Annotated[int, typer.Option(help="N: classes per episode (from the unseen ones)")] = 4,
    shots: Annotated[str, typer.Option(help="K values, comma-separated")] = "1,5",
    queries: Annotated[int, typer.Option(help="query images per class")] = 15,
    episodes: Annotated[int, typer.Option(help="episodes per (width, K, head)")] = 600,
    heads: Annotated[str, typer.Option(help="proto (prototypes) and/or maml (first-order MAML linear head)")] = "proto,maml",
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="JSON file for the results (default <run>/fewshot.json)")] = None,
    force: Annotated[bool, typer.Option("--force", help="--out may overwrite a file `metaaug fewshot` did not write")] = False,
) -> None:
    """N-way K-shot episodes on the classes the run did not train on, at each width: mean accuracy and 95% interval."""
    from metaaug.qat.fewshot import EpisodeConfig, run_fewshot

    try:
        widths = [None if b.strip() == "fp" else int(b) for b in bits.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--bits must be comma-separated widths or fp, got {bits!r}") from None
    if not widths:
        raise ConfigError("--bits is empty; give e.g. fp,2,4,8")
    cfg = EpisodeConfig(ways=ways, shots=parse_bits(shots, "--shots"), queries=queries, episodes=episodes,
                        heads=tuple(h.strip() for h in heads.split(",") if h.strip()), seed=seed)
    results = run_fewshot(run, widths, cfg, out, force)
    table = Table(title=f"{ways}-way episodes on unseen classes {results['unseen_classes']} ({episodes} each)")
    for col in ("width", "head", "K", "accuracy", "95% interval"):
        table.add_column(col)
    for r in results["results"]:
        table.add_row(r["width"], r["head"], str(r["shots"]), f"{r['mean']:.2f}", f"± {r['ci95']:.2f}")
    out_console.print(table)
    out_console.print(json.dumps({"results": results["path"]}))
