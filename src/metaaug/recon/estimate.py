"""Know the cost before paying it: the time and cache memory of a reconstruction, estimated before it starts.

One batch of calibration images is walked through the model unit by unit; each distinct unit (by type and input
shapes) gets a few timed forward+backward passes on that batch, and the cache each unit needs is the batch's live
tensors scaled to the whole calibration set. The passes run with quantization off, take no random numbers and
change no parameter, so the run that follows is bit-identical with or without the estimate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from metaaug.quant.prepare import QuantModel
from metaaug.recon.cache import human, is_rows
from metaaug.recon.stepper import GraphStepper

TIMED = 2  # passes timed per distinct unit, after one warm-up


@dataclass
class UnitEstimate:
    name: str
    ms_per_iter: float
    cache_bytes: int


@dataclass
class JobEstimate:
    """Per unit: estimated ms per iteration and cache bytes; `iters` per unit; how long the estimate took."""

    units: list[UnitEstimate] = field(default_factory=list)
    iters: int = 0
    probe_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return sum(u.ms_per_iter for u in self.units) * self.iters / 1000

    @property
    def cache_peak(self) -> int:
        return max((u.cache_bytes for u in self.units), default=0)

    def summary(self) -> dict:
        return {"recon_seconds": round(self.seconds, 1), "cache_peak": human(self.cache_peak),
                "probe_seconds": round(self.probe_seconds, 1),
                "basis": "forward+backward with quantization off; fake-quant steps are slower"}


def _bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(_bytes(v) for v in value)
    return 0


def _signature(unit: nn.Module, args: tuple) -> tuple:
    shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
    params = tuple(tuple(p.shape) for p in unit.parameters())
    return type(unit).__name__, shapes, params


def _time_unit(unit: nn.Module, args: tuple) -> float:
    """ms of one forward+backward of `unit` on `args`, gradients to the inputs only (no parameter's .grad moves)."""
    inputs = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    elapsed = 0.0
    for i in range(TIMED + 1):
        start = time.perf_counter()
        out = unit(*inputs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs and leaves:
            torch.autograd.grad([o.float().square().mean() for o in outs], leaves, allow_unused=True)
        if i:
            elapsed += time.perf_counter() - start
    return 1000 * elapsed / TIMED


def estimate(qmodel: QuantModel, images: torch.Tensor, batch_size: int, iters: int, device: torch.device,
             skip: int = 0) -> JobEstimate:
    """The job's estimate; units before `skip` (already done on resume) are left out."""
    from metaaug.recon.engine import fp_mode

    start = time.perf_counter()
    n, bs = images.shape[0], min(batch_size, images.shape[0])
    scale = n / bs
    stepper = GraphStepper(qmodel, images[:bs], device, device, None)
    seen: dict[tuple, float] = {}
    result = JobEstimate(iters=iters)
    with fp_mode(qmodel):
        for k, name in enumerate(qmodel.unit_names):
            unit = qmodel.unit(k)
            with torch.no_grad():
                args = stepper.advance_to(k)
                live = sum(_bytes(v) for v in stepper.env.values() if is_rows(v))
                out = unit(*args)
            if k >= skip:
                sig = _signature(unit, args)
                if sig not in seen:
                    seen[sig] = _time_unit(unit, args)
                # both paths' live tensors (quantized and FP) and the FP output, for the whole calibration set
                result.units.append(UnitEstimate(name, round(seen[sig], 3), int((2 * live + _bytes(out)) * scale)))
            with torch.no_grad():
                stepper.step(out)
    result.probe_seconds = time.perf_counter() - start
    return result
