"""`metaaug synth`: FDDA synthetic calibration images from a model's BN statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from metaaug.cli.common import app, console, friendly, out_console, parse_options, refuse_set


@app.command()
@friendly
def synth(
    model: Annotated[str, typer.Option(help="bundled name (resnet20, mobilenetv2) or path/to/file.py:factory (with BatchNorm)")] = "resnet20",
    weights: Annotated[str | None, typer.Option(help="weights (.safetensors, or torch state dict) for --model")] = None,
    per_class: Annotated[int, typer.Option(help="synthetic images to write per class")] = 100,
    steps: Annotated[int, typer.Option(help="generator training steps")] = 1000,
    real_per_class: Annotated[int, typer.Option(help="real training images per class for the class BNS centres; 0 = data-free")] = 1,
    out: Annotated[Path | None, typer.Option(help="folder for images.safetensors, class_<k>.png and report.json (default synth)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: Annotated[str | None, typer.Option(help="folder of IDX files or train/ test/ image folders (for the real images)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    option: Annotated[list[str] | None, typer.Option("--set", help="FDDAConfig field key=value (repeatable), e.g. --set w_centralised=0.05")] = None,
    force: Annotated[bool, typer.Option("--force", help="--out may replace a folder of images that no metaaug synth run claimed")] = False,
) -> None:
    """Train FDDA's class-conditional generator on the FP model's BN statistics and save synthetic calibration images."""
    from metaaug.data import load_dataset
    from metaaug.data.checks import check_model_fits_data
    from metaaug.environment import resolve_device
    from metaaug.models.registry import build_model
    from metaaug.runs.folder import RunFolder
    from metaaug.synth import FDDAConfig, save_synth, synthesize
    from metaaug.synth.bns import bn_layers

    options = parse_options(option or [])
    refuse_set(options, {"per_class": "--per-class", "steps": "--steps", "real_per_class": "--real-per-class", "seed": "--seed"})
    cfg = FDDAConfig.from_options(**options, per_class=per_class, steps=steps, real_per_class=real_per_class, seed=seed)
    out = out or Path("synth")
    identity = {"model": model, "weights": weights, "data_dir": data_dir, "fdda": dataclasses.asdict(cfg)}
    RunFolder.check(out, "synth", identity, restart=force)
    dev = resolve_device(device)
    fp_model = build_model(model, weights)
    bn_layers(fp_model)
    # the real images' descriptor sets the image shape and range; data-free runs use --set image_shape/value_range
    # (default: Fashion-MNIST's 1x28x28) and read no data at all
    real = load_dataset(data_dir, "train") if cfg.real_per_class > 0 else None
    if real is not None:
        check_model_fits_data(fp_model, data_dir, train=real)
    result = synthesize(fp_model, cfg, real, dev, console)
    result.report.update({"model": model, "weights": weights, "data_dir": data_dir})
    RunFolder.claim(out, "synth", identity, restart=force)
    save_synth(result, out, f"FDDA synthetic images ({Path(model.split(':')[0]).stem})")
    r = result.report
    out_console.print(f"{r['images']} images, FP accuracy on them {r['fp_accuracy']}%, BN-statistics distance "
                      f"{r['bns_distance']['before']['global']:.4f} -> {r['bns_distance']['after']['global']:.4f} "
                      f"in {r['seconds']}s; folder: {out}")
