"""`metaaug export`: a deployable ONNX (QDQ) or packed-integer file from a run folder, checked after writing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metaaug.cli.common import app, friendly, out_console
from metaaug.errors import ConfigError

FORMATS = {"onnx": "model.onnx", "packed": "model.mq.safetensors"}


def _kib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024:.1f} KiB"


@app.command()
@friendly
def export(
    run: Annotated[Path, typer.Option(help="run folder written by `metaaug quantize`")],
    format: Annotated[str, typer.Option("--format", help="onnx (QDQ graph, checked in onnxruntime) | packed (bit-packed safetensors)")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="output file (default <run>/model.onnx or <run>/model.mq.safetensors)")] = None,
    data_dir: Annotated[str | None, typer.Option(help="test data for the check (default: the run's)")] = None,
    limit: Annotated[int | None, typer.Option(help="check on the first N test images only")] = None,
    tol_top1: Annotated[float, typer.Option(help="onnx: max |onnx top-1 - torch top-1| in points")] = 0.1,
    min_agreement: Annotated[float, typer.Option(help="onnx: min % of predictions onnxruntime and PyTorch agree on")] = 99.5,
    bits: Annotated[str | None, typer.Option(help="QAT runs: the width to export, e.g. 4 (W=A) or 2,4")] = None,
    act_container: Annotated[str, typer.Option(help="onnx: QDQ container of <= 4-bit activations: auto (4-bit where onnxruntime "
                                                    "accepts it, 8-bit before MaxPool and the like; exact either way) | int4 | int8")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="--out may overwrite a file `metaaug export` did not write")] = False,
) -> None:
    """Export a quantized run; results (onnx_top1, torch_top1, max_abs_logit_diff, sizes) go to <run>/export.json."""
    from metaaug.export.jobs import check_export_out, export_onnx_run, export_packed_run
    from metaaug.export.onnx_quant import check_act_container
    from metaaug.runs.opened import open_run

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be positive, got {limit}")
    check_act_container(act_container)
    width = open_run(run, "export").check_bits(bits)  # before anything is loaded
    out = out or run / (FORMATS[format] if width is None else f"w{width[0]}a{width[1]}." + FORMATS[format])
    check_export_out(run, out, format, force)
    if format == "onnx":
        r = export_onnx_run(run, out, data_dir, limit, tol_top1, min_agreement, act_container, bits=bits)
        out_console.print(f"wrote {out} ({_kib(r['onnx_bytes'])}); onnxruntime top-1 {r['onnx_top1']:.2f} vs PyTorch "
                          f"{r['torch_top1']:.2f} on {r['onnx_images']} images, {r['onnx_agreement']:.2f}% agreement, "
                          f"max |logit diff| {r['max_abs_logit_diff']:.3g}: check passed", highlight=False)
    else:
        r = export_packed_run(run, out, data_dir, limit, bits=bits)
        vs = f", {r['compression_vs_checkpoint']}x smaller than the FP checkpoint ({_kib(r['fp_checkpoint_bytes'])})" \
            if r["compression_vs_checkpoint"] else ""
        out_console.print(f"wrote {out} ({_kib(r['packed_bytes'])}{vs}); integer weights {_kib(r['packed_weight_bytes'])} vs "
                          f"FP32 {_kib(r['fp32_weight_bytes'])} ({r['compression_weights']}x); rebuilt model top-1 "
                          f"{r['packed_top1']:.2f}, identical logits", highlight=False)
    out_console.print(f"results: {run / 'export.json'}", highlight=False)
