"""Export a finished run folder and check the result against the run's PyTorch fake-quant model.

Shared by `metaaug export` and `bench/export.py`; results are merged into `<run>/export.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from metaaug.data import load_dataset
from metaaug.data.datasets import ImageDataset
from metaaug.errors import ModelError
from metaaug.evaluate import accuracy, logits_of
from metaaug.pipeline import load_run

EXPORT_JSON = "export.json"


def fp_checkpoint_path(model: str, weights: str | None) -> Path | None:
    """The FP checkpoint the run started from (the bundled one when `--weights` was not given)."""
    from metaaug.models.registry import BUNDLED, bundled_weights

    if weights is not None:
        return Path(weights)
    return bundled_weights(model) if model in BUNDLED else None


def record(run_dir: str | Path, results: dict[str, Any]) -> dict[str, Any]:
    """Merge `results` into `<run>/export.json` (one file for both formats) and return the merged dict."""
    path = Path(run_dir) / EXPORT_JSON
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)
    return merged


def _test_set(run_data_dir: str | None, data_dir: str | None, limit: int | None) -> ImageDataset:
    test = load_dataset(data_dir or run_data_dir, "test")
    return test.subset(torch.arange(min(limit, len(test)))) if limit else test


def load_for_export(run_dir: str | Path, bits: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The run's quantized model and what the packed file records of it: a `quantize` run as it is, a `qat` run at
    the width `bits` (e.g. '4' or '2,4')."""
    from metaaug.qat.job import export_view, is_qat_run, parse_width

    if is_qat_run(run_dir):
        if bits is None:
            raise ModelError(f"{run_dir} is a QAT run: give the width to export with --bits (e.g. --bits 4)")
        qmodel, meta = export_view(run_dir, parse_width(bits))
        return qmodel, meta
    if bits is not None:
        raise ModelError(f"--bits applies to QAT run folders only; {run_dir} holds one quantized width")
    qmodel, cfg, report = load_run(run_dir, "cpu")
    units = cfg.units if cfg.units is not None else cfg.method_cfg().units
    extra = {"quant_top1": report.get("quant_top1"), "fp_top1": report.get("fp_top1"), "data_dir": cfg.data_dir,
             "wbits": cfg.wbits, "abits": cfg.abits}
    return qmodel, {"model": cfg.model, "method": cfg.method, "spec": dataclasses.asdict(cfg.spec()), "units": units,
                    "extra": extra, "weights": cfg.weights, "data_dir": cfg.data_dir}


def export_onnx_run(run_dir: str | Path, out: str | Path, data_dir: str | None = None, limit: int | None = None,
                    tol_top1: float = 0.1, min_agreement: float = 99.5, act_int4: bool = True,
                    bits: str | None = None) -> dict[str, Any]:
    """Write the QDQ ONNX model, run it in onnxruntime on the test set and compare with PyTorch.

    Raises ModelError (after recording the numbers) when top-1 differs by more than `tol_top1` points or fewer
    than `min_agreement` % of the predictions agree.
    """
    from metaaug.export.onnx_export import export_onnx, onnx_logits, require_onnx

    require_onnx()
    qmodel, meta = load_for_export(run_dir, bits)
    test = _test_set(meta["data_dir"], data_dir, limit)
    start = time.perf_counter()
    export_onnx(qmodel, out, test.images[:1], act_int4=act_int4)
    export_s = time.perf_counter() - start
    ref = logits_of(qmodel, test.images)
    got = onnx_logits(out, test.images, threads=torch.get_num_threads())
    onnx_top1, torch_top1 = accuracy(got, test.labels), accuracy(ref, test.labels)
    agreement = 100.0 * float((got.argmax(1) == ref.argmax(1)).float().mean())
    results = {
        "onnx_path": str(out), "onnx_bytes": Path(out).stat().st_size, "onnx_images": len(test),
        "onnx_top1": round(onnx_top1, 2), "torch_top1": round(torch_top1, 2),
        "onnx_agreement": round(agreement, 2), "max_abs_logit_diff": round(float((got - ref).abs().max()), 6),
        "onnx_act_int4": act_int4, "onnx_export_seconds": round(export_s, 2),
        "onnx_tolerance": {"top1_points": tol_top1, "min_agreement": min_agreement},
    }
    ok = abs(onnx_top1 - torch_top1) <= tol_top1 and agreement >= min_agreement
    results["onnx_check"] = "passed" if ok else "failed"
    record(run_dir, results)
    if not ok:
        raise ModelError(f"onnxruntime disagrees with the PyTorch fake-quant model: top-1 {onnx_top1:.2f} vs {torch_top1:.2f} "
                         f"(tolerance {tol_top1} points), {agreement:.2f}% predictions agree (need {min_agreement}%), "
                         f"max |logit diff| {results['max_abs_logit_diff']}")
    return results


def export_packed_run(run_dir: str | Path, out: str | Path, data_dir: str | None = None, limit: int | None = None,
                      bits: str | None = None) -> dict[str, Any]:
    """Write the packed file, rebuild the model from it alone and check its logits equal the run's exactly."""
    from metaaug.export.pack import load_quantized, save_packed

    qmodel, meta = load_for_export(run_dir, bits)
    sizes = save_packed(qmodel, out, {k: meta[k] for k in ("model", "method", "spec", "units", "extra")})
    test = _test_set(meta["data_dir"], data_dir, limit)
    ref = logits_of(qmodel, test.images)
    got = logits_of(load_quantized(out), test.images)
    diff = float((got - ref).abs().max())
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
    record(run_dir, results)
    if diff != 0.0:
        raise ModelError(f"the model rebuilt from {out} differs from the run's model (max |logit diff| {diff:g})")
    return results

