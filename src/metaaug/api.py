"""The one verb: `quantize(model, calib_images, method, spec)` returns a fake-quant model (torchao-style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metaaug.data.datasets import check_finite
from metaaug.errors import ConfigError, DataError
from metaaug.methods.configs import ReconConfig, method_config
from metaaug.quant.prepare import QuantModel, QuantSpec, prepare
from metaaug.recon.engine import ENGINES, Progress, Reconstructor

MIN_CALIB = 16


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    return dev


def check_calibration(images: torch.Tensor, batch_size: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise DataError("calibration images must be a tensor of shape (N, C, H, W)")
    check_finite(images, "calibration data")
    need = max(MIN_CALIB, batch_size)
    if images.shape[0] < need:
        raise DataError(f"calibration set too small: {images.shape[0]} images, need at least {need}")


def engine_for(cfg: ReconConfig) -> type[Reconstructor]:
    """The engine class a method runs on: the plain reconstruction loop unless the method registered its own."""
    return ENGINES.get(cfg.name, Reconstructor)


def quantize(model: nn.Module, calib_images: torch.Tensor, method: str | ReconConfig = "qdrop",
             spec: QuantSpec | None = None, *, seed: int = 0, device: str | torch.device = "auto",
             units: str | Sequence[str] | None = None, progress: Progress | None = None, store=None,
             engine_kwargs: dict | None = None) -> QuantModel:
    """Quantize `model` with `method` on unlabeled `calib_images`; returns the fake-quant model, quantization on.

    `units` overrides the method's reconstruction units ('block', 'layer' or module paths).
    `store` (a `RunStore`) saves progress after every unit and resumes from it.
    """
    cfg = method_config(method)
    spec = spec or QuantSpec()
    dev = resolve_device(device)
    check_calibration(calib_images, cfg.batch_size)
    qmodel = prepare(model, spec, units if units is not None else cfg.units).to(dev)
    engine = engine_for(cfg)(qmodel, cfg, seed=seed, device=dev, progress=progress, store=store, **(engine_kwargs or {}))
    qmodel.engine_stats = engine.run(calib_images)
    qmodel.engine = engine
    qmodel.harden()
    qmodel.set_quant(True, True)
    return qmodel.eval()
