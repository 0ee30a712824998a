"""When MetaAug's meta steps run inside a unit's reconstruction (`meta_schedule="spread"`), and the small pieces
the meta phase shares between its schedules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from metaaug.quant.prepare import QuantModel
from metaaug.recon.engine import UnitData


@dataclass
class SpreadPlan:
    """Where one unit's meta steps fall in its reconstruction, and what they have logged so far."""

    unit: int
    real: UnitData
    at: list[int]
    done: list[int] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def spread_positions(steps: int, iters: int) -> list[int]:
    """`steps` reconstruction iterations at even intervals over `iters`, starting at the first (at most one each)."""
    return sorted({(i * iters) // steps for i in range(steps)}) if steps and iters else []


def curve_point(curve: list[dict], step: int, log: dict[str, float], keep: bool) -> None:
    """Append one meta step's losses (rounded) to a unit's curve when `keep` (every `log_every`-th and the last)."""
    if keep:
        curve.append({"step": step, **{n: round(v, 6) for n, v in log.items()}})


def rows_of(out: torch.Tensor | tuple, rows: slice) -> torch.Tensor | tuple:
    return out[rows] if isinstance(out, torch.Tensor) else tuple(o[rows] for o in out)


@contextmanager
def full_quantization(qmodel: QuantModel, unit: nn.Module) -> Iterator[None]:
    """Turn QDrop's random dropping of the unit's activation quantization off for a meta step, then restore it."""
    acts = list(qmodel.act_quantizers(unit))
    saved = [aq.quant_prob for aq in acts]
    for aq in acts:
        aq.quant_prob = 1.0
    try:
        yield
    finally:
        for aq, p in zip(acts, saved, strict=True):
            aq.quant_prob = p
