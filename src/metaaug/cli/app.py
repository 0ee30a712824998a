"""`metaaug` command line: quantize, eval, train."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from metaaug.cli.common import app, console, friendly, out_console, parse_ints, parse_options, refuse_set
from metaaug.config_check import SEED, check_value
from metaaug.errors import MetaAugError
from metaaug.methods.registry import method_names
from metaaug.quant.policy import Policy
from metaaug.quant.prepare import DEFAULT_ABITS, DEFAULT_WBITS
from metaaug.runs.outputs import check_output_file, json_marked


@app.command()
@friendly
def quantize(
    model: Annotated[str, typer.Option(help="bundled name (resnet20, mobilenetv2) or path/to/file.py:factory")] = "resnet20",
    weights: Annotated[str | None, typer.Option(help="weights (.safetensors, or torch state dict) for --model")] = None,
    method: Annotated[str, typer.Option(help=" | ".join(method_names()))] = "qdrop",
    wbits: Annotated[int, typer.Option(help="weight bits, 2..8")] = DEFAULT_WBITS,
    abits: Annotated[int, typer.Option(help="activation bits, 2..8")] = DEFAULT_ABITS,
    calib_size: Annotated[int | None, typer.Option(
        help="calibration images, stratified (default: 1024 real images; with --calib-source synthetic, the whole set)")] = None,
    iters: Annotated[int | None, typer.Option(
        help="iterations per unit (default 2000; the papers and the Python API's configs use 20000)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    data_dir: Annotated[str | None, typer.Option(help="folder of IDX files or train/ test/ image folders")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>-<method>-w<W>a<A>-s<seed>)")] = None,
    no_fold_bn: Annotated[bool, typer.Option("--no-fold-bn", help="keep BatchNorm unfolded")] = False,
    units: Annotated[str | None, typer.Option(help="comma-separated module paths to use as reconstruction units")] = None,
    meta_iters: Annotated[int | None, typer.Option(help="MetaAug: meta steps per unit")] = None,
    holdout: Annotated[float, typer.Option(help="fraction of the calibration set held out (not reconstructed on) to estimate accuracy")] = 0.0,
    option: Annotated[list[str] | None, typer.Option("--set", help="method option key=value (repeatable), e.g. --set round_weight=0.1")] = None,
    calib_source: Annotated[str, typer.Option(help="real | synthetic (--calib-size of --synth) | mixed (--calib-size real + synthetic)")] = "real",
    synth: Annotated[str | None, typer.Option(help="folder written by `metaaug synth` (for --calib-source synthetic|mixed)")] = None,
    mixed_synth: Annotated[int | None, typer.Option(help="--calib-source mixed: synthetic images to add (stratified; default all)")] = None,
    policy: Annotated[Path | None, typer.Option(help="policy.json with per-layer bits (mixed precision); replaces --wbits/--abits")] = None,
    softmax_grid: Annotated[str, typer.Option(help="grid of the quantizer on attention's softmax output: uniform | log2")] = "uniform",
    ln_reparam: Annotated[bool, typer.Option("--ln-reparam", help="move LayerNorm's per-channel ranges into the next Linear (RepQ-ViT)")] = False,
    cache_budget: Annotated[str | None, typer.Option(
        help="memory for the reconstruction caches, e.g. 8GB (KB/MB/GB, 1024-based); past it they spill to disk "
             "(default: half the free memory)")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="folder for spilled caches (default: a temporary folder)")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="start the run folder over (its progress and results are deleted)")] = False,
    fast: Annotated[bool, typer.Option("--fast", help="bf16 autocast and compiled fake-quant in the reconstruction steps "
                                       "(--set compute_dtype=bfloat16 --set compile_fake_quant=true; bench/speed)")] = False,
) -> None:
    """Quantize a model and write report.json + quantized.safetensors to the run folder (resumes if interrupted)."""
    from metaaug.cli.progress import RichProgress, report_table
    from metaaug.pipeline import RunConfig, run_job

    options: dict[str, object] = dict(parse_options(option or []))
    if meta_iters is not None:
        refuse_set(options, {"meta_iters": "--meta-iters"})
        options["meta_iters"] = meta_iters
    if fast:
        for key in ("compute_dtype", "compile_fake_quant"):
            if key in options:
                raise MetaAugError(f"--fast sets {key}: drop --set {key}={options[key]} or --fast")
        options.update(compute_dtype="bfloat16", compile_fake_quant="true")
    from metaaug.errors import warn
    from metaaug.methods.registry import config_types
    from metaaug.pipeline import iterates
    from metaaug.recon.cache import CacheSettings

    cache = CacheSettings(budget=cache_budget, spill_dir=None if cache_dir is None else str(cache_dir))
    cls = config_types().get(method)
    if cls is not None and not iterates(cls):
        if iters is not None:
            warn(f"--iters {iters}: method {method} runs no iterations; ignored")
        run_iters = None  # RunConfig.iters None: the method's own (none)
    else:
        run_iters = 2000 if iters is None else iters
    cfg = RunConfig(model=model, weights=weights, method=method, wbits=wbits, abits=abits, calib_size=calib_size,
                    iters=run_iters, seed=seed, data_dir=data_dir, fold_bn=not no_fold_bn,
                    holdout=holdout, calib_source=calib_source, synth=synth, mixed_synth=mixed_synth,
                    units=units.split(",") if units else None, options=options,
                    policy=None if policy is None else Policy.load(policy).to_dict(), softmax_grid=softmax_grid, ln_reparam=ln_reparam)
    cfg.spec()
    cfg.method_cfg()
    bits = "policy" if policy is not None else f"w{wbits}a{abits}"
    out = out or Path("runs") / f"{Path(model.split(':')[0]).stem}-{method}-{bits}-s{seed}"
    with RichProgress(console) as prog:
        report = run_job(cfg, out, device, prog, restart=restart, cache=cache)
    out_console.print(report_table(report))
    out_console.print(f"run folder: {out}")


@app.command("eval")
@friendly
def eval_(
    run: Annotated[Path | None, typer.Option(help="run folder written by `metaaug quantize` or `metaaug qat`")] = None,
    quantized: Annotated[Path | None, typer.Option(help="packed file from `metaaug export --format packed` (no FP checkpoint needed)")] = None,
    bits: Annotated[str | None, typer.Option(help="QAT runs: the width to evaluate, e.g. 4 (W=A) or 2,4 (W,A); unseen widths work")] = None,
    data_dir: Annotated[str | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Rebuild the quantized model from a run folder or a packed file and report its test top-1."""
    from metaaug.data import load_dataset, only_classes
    from metaaug.data.checks import check_model_fits_data
    from metaaug.evaluate import top1

    if (run is None) == (quantized is None):
        raise MetaAugError("give exactly one of --run or --quantized")
    acc = None
    if quantized is not None:
        if bits is not None:
            raise MetaAugError("--bits applies to QAT run folders only; a packed file holds one width")
        from metaaug.environment import resolve_device
        from metaaug.export.pack import load_quantized, read_metadata

        extra = read_metadata(quantized)["extra"]
        qmodel, source = load_quantized(quantized, resolve_device(device)), {"quantized": str(quantized)}
    else:
        from metaaug.qat.job import eval_width
        from metaaug.runs.opened import open_run

        opened = open_run(run, "eval")
        width = opened.check_bits(bits)  # before anything is loaded
        if width is not None:  # on the run's own test split (a few-shot run's seen classes only)
            result = eval_width(run, width, device)
            acc, extra = result.pop("quant_top1"), {"quant_top1": result.pop("report_quant_top1")}
            source = result
        else:
            qmodel, meta = opened.view(None, device)
            extra, source = meta["extra"], {"run": str(run)}
    expected, data_dir = extra.get("quant_top1"), data_dir or extra.get("data_dir")
    if acc is None:  # a width of a few-shot QAT run was scored on its seen classes: so is its export
        test = only_classes(load_dataset(data_dir, "test"), None if extra.get("classes") is None else tuple(extra["classes"]))
        check_model_fits_data(qmodel, data_dir, test=test)
        acc = round(top1(qmodel, test, device=next(qmodel.parameters()).device), 2)
    same = None if expected is None else acc == expected  # None: the run reported no top-1 for this width to compare
    typer.echo(json.dumps({**source, "quant_top1": acc, "report_quant_top1": expected, "reproduced": same}))
    if same is False:
        raise typer.Exit(1)


@app.command()
@friendly
def train(
    model: Annotated[str, typer.Option(help="bundled model to train")] = "resnet20",
    epochs: Annotated[int, typer.Option()] = 15,
    out: Annotated[Path | None, typer.Option(help="folder for <model>_fmnist.safetensors")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    classes: Annotated[str | None, typer.Option(help="train on these classes only (few-shot seen classes), e.g. 0,1,2,3,4,5")] = None,
) -> None:
    """Train a bundled FP model on Fashion-MNIST (the recipe in the model card)."""
    from metaaug.models.registry import BUNDLED, WEIGHTS_DIR
    from metaaug.train import recipe
    from metaaug.train import train as train_fn

    if model not in BUNDLED:
        raise MetaAugError(f"unknown model {model!r}; trainable: {', '.join(BUNDLED)}")
    check_value("--epochs", epochs, ">= 1")
    check_value("--seed", seed, SEED)
    seen = parse_ints(classes, "--classes")
    out = out or WEIGHTS_DIR
    if out.exists() and not out.is_dir():
        raise MetaAugError(f"--out {out} is a file; give a folder for the weights")
    card = train_fn(model, epochs, *recipe(model), seed, out, seen)
    out_console.print_json(json.dumps(card))


@app.command()
@friendly
def models() -> None:
    """List the bundled models: FP top-1 on the Fashion-MNIST test split (from their model card), parameters, units."""
    from rich.table import Table

    from metaaug.models.registry import BUNDLED, bundled_weights

    table = Table(title="bundled models (weights ship with the package)")
    for col in ("model", "fp_top1", "parameters", "trained", "weights"):
        table.add_column(col, justify="left" if col in ("model", "weights", "trained") else "right")
    for name, factory in BUNDLED.items():
        card_path = bundled_weights(name).with_suffix(".json")
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        params = sum(p.numel() for p in factory().parameters())
        trained = f"{card['epochs']} epochs, {card['seconds'] / 60:.0f} min" if card else "-"
        if "seconds_note" in card:  # wall time that includes pauses: the model card gives the real figure
            trained += " (wall, see MODEL_CARD.md)"
        table.add_row(name, f"{card.get('test_top1', '-')}", f"{params:,}", trained, bundled_weights(name).name)
    out_console.print(table)


@app.command()
@friendly
def cost(
    model: Annotated[str, typer.Option(help="bundled name or path/to/file.py:factory")] = "resnet20",
    weights: Annotated[str | None, typer.Option(help="weights for --model (needed for a user model)")] = None,
    policy: Annotated[Path | None, typer.Option(help="policy.json to cost (default: uniform --wbits/--abits)")] = None,
    wbits: Annotated[int, typer.Option(help="uniform weight bits when no --policy")] = DEFAULT_WBITS,
    abits: Annotated[int, typer.Option(help="uniform activation bits when no --policy")] = DEFAULT_ABITS,
    data_dir: Annotated[str | None, typer.Option(help="data whose image shape the model takes")] = None,
    write_policy: Annotated[Path | None, typer.Option(help="write the costed policy as JSON (a template to edit)")] = None,
    force: Annotated[bool, typer.Option("--force", help="--write-policy may overwrite a file `metaaug cost` did not write")] = False,
) -> None:
    """Weight memory and BOPs of a bit-width policy, per layer and in total, against FP32 and uniform W8A8."""
    from metaaug.cli.progress import cost_table
    from metaaug.data import load_dataset
    from metaaug.data.checks import check_model_fits_data
    from metaaug.models.registry import build_model
    from metaaug.quant.cost import model_bits, model_cost
    from metaaug.quant.prepare import QuantSpec, prepare

    if write_policy is not None:
        check_output_file(write_policy, "--write-policy", COST_MARK, json_marked(COST_MARK), force)
    spec = QuantSpec(wbits, abits, policy=None if policy is None else Policy.load(policy))
    test = load_dataset(data_dir, "test")
    qmodel = prepare(build_model(model, weights), spec, "layer", test.images)
    check_model_fits_data(qmodel, data_dir, test=test)
    report = model_cost(qmodel, test.images[:1])
    out_console.print(cost_table(report))
    if write_policy is not None:
        Policy(model_bits(qmodel)).save(write_policy, written_by=COST_MARK)
        out_console.print(f"policy written to {write_policy}")


COST_MARK = "metaaug cost"


from metaaug.cli import export_cmd, qat_cmd, runs_cmd, search_cmd, synth_cmd  # noqa: E402,F401  (register their commands)


def main() -> None:
    if len(sys.argv) == 1:
        sys.argv.append("quantize")  # `metaaug` alone runs the embedded default
    app()


if __name__ == "__main__":
    main()
