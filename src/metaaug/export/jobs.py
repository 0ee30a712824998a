"""Export a finished run folder and check the result against the run's PyTorch fake-quant model.

Shared by `metaaug export` and `bench/export.py`; results are merged into `<run>/export.json`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from metaaug.data import load_dataset
from metaaug.data.checks import check_model_fits_data
from metaaug.data.datasets import ImageDataset
from metaaug.errors import MetaAugError, ModelError
from metaaug.evaluate import accuracy, logits_of
from metaaug.runs import files
from metaaug.runs.opened import open_run
from metaaug.runs.outputs import check_output_file

EXPORT_JSON = "export.json"


def fp_checkpoint_path(model: str, weights: str | None) -> Path | None:
    """The FP checkpoint the run started from (the bundled one when `--weights` was not given)."""
    from metaaug.models.registry import BUNDLED, bundled_weights

    if weights is not None:
        return Path(weights)
    return bundled_weights(model) if model in BUNDLED else None


def record(run_dir: str | Path, results: dict[str, Any], width: str | None = None) -> dict[str, Any]:
    """Merge `results` into `<run>/export.json` (one file for both formats) and return the merged dict. A QAT run's
    results are kept per width (`{"widths": {"w4a4": {...}}}`), so exports of two widths never mix."""
    path = Path(run_dir) / EXPORT_JSON
    merged = files.read_json(path, "export results", f"delete {path.name} (it only records exports)") if path.exists() else {}
    if not isinstance(merged, dict):
        merged = {}
    if width is None:
        merged.update(results)
    else:
        merged.setdefault("widths", {}).setdefault(width, {}).update({"width": width, **results})
    files.write_json(path, merged)
    return merged


def is_onnx_export(path: Path) -> bool:
    """An ONNX file metaaug wrote (an earlier export, which the next one may replace)."""
    try:
        import onnx

        return onnx.load(str(path), load_external_data=False).producer_name == "metaaug"
    except Exception:  # not ONNX, truncated, or onnx not installed: not ours to replace
        return False


def is_packed_export(path: Path) -> bool:
    from metaaug.export.pack import read_metadata

    try:
        read_metadata(path)
        return True
    except MetaAugError:
        return False


def check_export_out(run_dir: str | Path, out: str | Path, format: str, force: bool = False) -> Path:
    """Where the export may go: never over the run's own files or a file another command wrote (without
    `force`), never into another job's run folder. Checked before anything is loaded."""
    from metaaug.runs.folder import RunFolder

    run = RunFolder.open(run_dir, ("quantize", "qat"), "export")
    owned = is_onnx_export if format == "onnx" else is_packed_export
    return check_output_file(out, "--out", "metaaug export", owned, force, own_run=run)


def _test_set(run_data_dir: str | None, data_dir: str | None, limit: int | None) -> ImageDataset:
    test = load_dataset(data_dir or run_data_dir, "test")
    return test.subset(torch.arange(min(limit, len(test)))) if limit else test


def load_for_export(run_dir: str | Path, bits: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The run's quantized model and what the packed file records of it: a `quantize` run as it is, a `qat` run at
    the width `bits` (e.g. '4' or '2,4')."""
    return open_run(run_dir, "export").view(bits, "cpu")


def _width(bits: str | None) -> str | None:
    from metaaug.qat.job import parse_width
    from metaaug.qat.switchable import width_name

    return None if bits is None else width_name(parse_width(bits))


def export_onnx_run(run_dir: str | Path, out: str | Path, data_dir: str | None = None, limit: int | None = None,
                    tol_top1: float = 0.1, min_agreement: float = 99.5, act_container: str = "auto",
                    bits: str | None = None) -> dict[str, Any]:
    """Write the QDQ ONNX model, run it in onnxruntime on the test set and compare with PyTorch.

    `act_container`: "auto" (4-bit activation pairs where onnxruntime takes them), "int4" or "int8".
    Raises ModelError (after recording the numbers) when top-1 differs by more than `tol_top1` points or fewer
    than `min_agreement` % of the predictions agree.
    """
    from metaaug.export.onnx_export import export_onnx, onnx_logits, require_onnx
    from metaaug.export.onnx_quant import check_act_container

    require_onnx()
    check_act_container(act_container)
    qmodel, meta = load_for_export(run_dir, bits)
    test = _test_set(meta["data_dir"], data_dir, limit)
    check_model_fits_data(qmodel, data_dir or meta["data_dir"], test=test)
    with files.atomic_path(out) as tmp:  # published only once the check passes: a failed export leaves no file
        start = time.perf_counter()
        export_onnx(qmodel, tmp, test.images[:1], act_container=act_container)
        export_s = time.perf_counter() - start
        ref = logits_of(qmodel, test.images)
        try:
            got = onnx_logits(tmp, test.images, threads=torch.get_num_threads())
        except Exception as err:  # onnxruntime refuses the graph (e.g. an operator type it does not implement)
            raise ModelError(f"onnxruntime cannot run the exported graph, nothing written: {str(err).splitlines()[0][:300]}") from None
        results, ok = _onnx_results(out, tmp, test, ref, got, act_container, export_s, tol_top1, min_agreement)
        record(run_dir, results, _width(bits))
        if not ok:
            raise ModelError(f"onnxruntime disagrees with the PyTorch fake-quant model, nothing written: top-1 "
                             f"{results['onnx_top1']:.2f} vs {results['torch_top1']:.2f} (tolerance {tol_top1} points), "
                             f"{results['onnx_agreement']:.2f}% predictions agree (need {min_agreement}%), "
                             f"max |logit diff| {results['max_abs_logit_diff']}")
    return results


def onnx_agreement(ref: torch.Tensor, got: torch.Tensor, labels: torch.Tensor, tol_top1: float = 0.1,
                   min_agreement: float = 99.5) -> tuple[dict[str, Any], bool]:
    """The check of an ONNX export: onnxruntime's logits `got` against PyTorch's `ref` on labelled images. It passes when
    top-1 differs by at most `tol_top1` points and at least `min_agreement` % of the predictions agree."""
    onnx_top1, torch_top1 = accuracy(got, labels), accuracy(ref, labels)
    agreement = 100.0 * float((got.argmax(1) == ref.argmax(1)).float().mean())
    ok = abs(onnx_top1 - torch_top1) <= tol_top1 and agreement >= min_agreement
    return {"onnx_top1": round(onnx_top1, 2), "torch_top1": round(torch_top1, 2), "onnx_agreement": round(agreement, 2),
            "max_abs_logit_diff": round(float((got - ref).abs().max()), 6),
            "onnx_tolerance": {"top1_points": tol_top1, "min_agreement": min_agreement},
            "onnx_check": "passed" if ok else "failed"}, ok


def _onnx_results(out: str | Path, tmp: Path, test: ImageDataset, ref: torch.Tensor, got: torch.Tensor, act_container: str,
                  export_s: float, tol_top1: float, min_agreement: float) -> tuple[dict[str, Any], bool]:
    check, ok = onnx_agreement(ref, got, test.labels, tol_top1, min_agreement)
    results = {"onnx_path": str(out), "onnx_bytes": tmp.stat().st_size, "onnx_images": len(test), **check,
               "onnx_act_container": act_container, "onnx_export_seconds": round(export_s, 2)}
    return results, ok


def export_packed_run(run_dir: str | Path, out: str | Path, data_dir: str | None = None, limit: int | None = None,
                      bits: str | None = None) -> dict[str, Any]:
    """Write the packed file, rebuild the model from it alone and check its logits equal the run's exactly."""
    from metaaug.export.pack import load_quantized, save_packed

    qmodel, meta = load_for_export(run_dir, bits)
    test = _test_set(meta["data_dir"], data_dir, limit)
    check_model_fits_data(qmodel, data_dir or meta["data_dir"], test=test)
    with files.atomic_path(out) as tmp:  # published only once the rebuilt model matches: a failed check leaves no file
        sizes = save_packed(qmodel, tmp, {k: meta[k] for k in ("model", "method", "spec", "units", "extra")})
        ref = logits_of(qmodel, test.images)
        got = logits_of(load_quantized(tmp), test.images)
        diff = float((got - ref).abs().max())
        results = _packed_results(out, sizes, meta, test, ref, got, diff)
        record(run_dir, results, _width(bits))
        if diff != 0.0:
            raise ModelError(f"the model rebuilt from the packed file differs from the run's model (max |logit diff| {diff:g}), "
                             "nothing written")
    return results


def _packed_results(out: str | Path, sizes: dict[str, int], meta: dict[str, Any], test: ImageDataset, ref: torch.Tensor,
                    got: torch.Tensor, diff: float) -> dict[str, Any]:
    ckpt = fp_checkpoint_path(meta["model"], meta["weights"])
    ckpt_bytes = ckpt.stat().st_size if ckpt is not None and ckpt.is_file() else None
    results = {
        "packed_path": str(out), "packed_bytes": sizes["file_bytes"],
        "packed_weight_bytes": sizes["packed_weight_bytes"], "fp32_weight_bytes": sizes["fp32_weight_bytes"],
        "fp_checkpoint_bytes": ckpt_bytes,
        "compression_vs_checkpoint": round(ckpt_bytes / sizes["file_bytes"], 2) if ckpt_bytes else None,
        "compression_weights": round(sizes["fp32_weight_bytes"] / sizes["packed_weight_bytes"], 2),
        "packed_top1": round(accuracy(got, test.labels), 2), "packed_torch_top1": round(accuracy(ref, test.labels), 2),
        "packed_max_abs_logit_diff": diff,
    }
    return results

