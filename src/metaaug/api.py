"""The one verb: `quantize(model, calib_images, method, spec)` returns a fake-quant model (torchao-style)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metaaug.data.datasets import check_finite
from metaaug.errors import ConfigError, DataError
from metaaug.methods.registry import JobContext, MethodResult, handler_for, method_config
from metaaug.quant.prepare import QuantModel, QuantSpec, prepare
from metaaug.recon.engine import NullProgress, Progress


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to run on (`auto`: CUDA when present); on CUDA, full-FP32 arithmetic from here on (`ieee_fp32`)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    if dev.type == "cuda":
        ieee_fp32()
    return dev


def ieee_fp32() -> None:
    """Turn off TF32 for convolutions and matrix products. cuDNN convolves in TF32 by default on Ampere and later
    GPUs; its ~1e-3 relative error moves values across rounding thresholds, and a W4A4 ResNet-20 on an H200 then
    disagreed with the CPU on 2% of its predictions. Simulated quantization must compute what the CPU computes."""
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"


def check_calibration(images: torch.Tensor) -> None:
    """Any non-empty finite set works: batches are drawn with replacement, so a set smaller than a batch (10 images,
    one per class) is reconstructed on as it is."""
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise DataError("calibration images must be a tensor of shape (N, C, H, W)")
    check_finite(images, "calibration data")


def prepare_for(model: nn.Module, cfg: Any, spec: QuantSpec, units: str | Sequence[str] | None = None) -> QuantModel:
    """The fake-quant model a method works on: units from `units`, else the method's own (e.g. 'layer' for AdaRound)."""
    return prepare(model, spec, units if units is not None else getattr(cfg, "units", "block"))


def run_method(qmodel: QuantModel, cfg: Any, ctx: JobContext) -> MethodResult:
    """Run the registered handler of `cfg` on a prepared model; the result's model is final (hard rounding, eval)."""
    result = handler_for(cfg)(qmodel, cfg, ctx)
    result.model.harden()
    result.model.set_quant(True, True)
    result.model.eval()
    return result


def quantize(model: nn.Module, calib_images: torch.Tensor, method: Any = "qdrop", spec: QuantSpec | None = None, *,
             seed: int = 0, device: str | torch.device = "auto", units: str | Sequence[str] | None = None,
             progress: Progress | None = None, store=None) -> QuantModel:
    """Quantize `model` with `method` (a name or config dataclass) on unlabeled `calib_images`.

    Returns the fake-quant model, quantization on. `units` overrides the method's reconstruction units ('block',
    'layer' or module paths); `store` (a `RunStore`) saves progress after every unit and resumes from it.
    """
    cfg = method_config(method)
    dev = resolve_device(device)
    check_calibration(calib_images)
    qmodel = prepare_for(model, cfg, spec or QuantSpec(), units).to(dev)
    ctx = JobContext(calib_images, seed=seed, device=dev, progress=progress or NullProgress(), store=store)
    return run_method(qmodel, cfg, ctx).model
