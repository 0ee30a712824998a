"""The one verb: `quantize(model, calib_images, method, spec)` returns a fake-quant model (torchao-style)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metaaug.data.checks import check_calibration
from metaaug.environment import resolve_device
from metaaug.methods.registry import JobContext, MethodResult, handler_for, method_config
from metaaug.progress import NullProgress, Progress
from metaaug.quant.capture import Example
from metaaug.quant.prepare import QuantModel, QuantSpec, prepare
from metaaug.recon.cache import CacheSettings


def prepare_for(model: nn.Module, cfg: Any, spec: QuantSpec, units: str | Sequence[str] | None = None,
                example: Example = None) -> QuantModel:
    """The fake-quant model a method works on: units from `units`, else the method's own (e.g. 'layer' for AdaRound).
    `example`: inputs for models that only torch.export can capture."""
    return prepare(model, spec, units if units is not None else getattr(cfg, "units", "block"), example)


def run_method(qmodel: QuantModel, cfg: Any, ctx: JobContext) -> MethodResult:
    """Run the registered handler of `cfg` on a prepared model; the result's model is final (hard rounding, eval)."""
    result = handler_for(cfg)(qmodel, cfg, ctx)
    result.model.harden()
    result.model.set_quant(True, True)
    result.model.eval()
    return result


def quantize(model: nn.Module, calib_images: torch.Tensor, method: Any = "qdrop", spec: QuantSpec | None = None, *,
             seed: int = 0, device: str | torch.device = "auto", units: str | Sequence[str] | None = None,
             progress: Progress | None = None, store=None, cache: CacheSettings | None = None) -> QuantModel:
    """Quantize `model` with `method` (a name or config dataclass) on unlabeled `calib_images`.

    A method given by name runs with its paper's defaults (QDrop, BRECQ, AdaRound, MetaAug: 20000 iterations per
    unit, where the CLI's default is 2000); pass a config such as `QDropConfig(iters=2000)` to choose.
    Returns the fake-quant model, quantization on. `units` overrides the method's reconstruction units ('block',
    'layer' or module paths); `store` (a `RunStore`) saves progress after every unit and resumes from it;
    `cache` (`CacheSettings(budget="8GB")`) bounds the memory of the reconstruction caches (spilled to disk past it).
    """
    cfg = method_config(method)
    dev = resolve_device(device)
    check_calibration(calib_images)
    qmodel = prepare_for(model, cfg, spec or QuantSpec(), units, calib_images).to(dev)
    ctx = JobContext(calib_images, seed=seed, device=dev, progress=progress or NullProgress(), store=store, cache=cache)
    return run_method(qmodel, cfg, ctx).model
