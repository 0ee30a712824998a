"""Learned step sizes per bit-width: what the QAT banks and MetaQuantNet keep for each tensor they quantize.

Steps are learned as logarithms: an Adam step is then a relative change, the same for an 8-bit step of 1e-4 and a
2-bit step of 0.1 (learned directly, Adam's absolute steps drove 8-bit steps negative at a learning rate of 5e-3).
Each starts at its Lp-searched value (`metaaug.quant.lp`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


def interpolate(bits: int, known: list[int], value: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Linear interpolation in bits between the trained neighbours of an unseen width (the nearest one outside)."""
    lower = [b for b in known if b < bits]
    upper = [b for b in known if b > bits]
    if not lower or not upper:
        return value(max(lower) if lower else min(upper))
    lo, hi = max(lower), min(upper)
    t = (bits - lo) / (hi - lo)
    return (1 - t) * value(lo) + t * value(hi)


class WidthSteps(nn.ParameterDict):
    """One tensor's learned step per bit-width, keyed `str(bits)` (a ParameterDict, so a bank's `log_steps.4` keys
    read as they always have).

    Absolute (the QAT banks): the parameter is `log(s_b)`, the step `exp(.)`. Relative (MetaQuantNet): the parameter
    is a log multiplier of the searched step, starting at exactly 0, the step `s_b * exp(.)`, so the first step is the
    searched one bit for bit; the searched steps are not saved (they are searched again from the weights).
    """

    def __init__(self, steps: Mapping[int, torch.Tensor], relative: bool = False) -> None:
        super().__init__()
        self.relative = relative
        for b, s in steps.items():
            self[str(b)] = nn.Parameter(torch.zeros_like(s) if relative else s.log())
            if relative:
                self.register_buffer(f"base{b}", s.detach().clone(), persistent=False)

    @property
    def widths(self) -> list[int]:
        return sorted(int(k) for k in self.keys())

    def step(self, bits: int) -> torch.Tensor:
        log = self[str(bits)]
        return getattr(self, f"base{bits}") * log.exp() if self.relative else log.exp()


class SwitchableSteps:
    """Steps of a quantizer whose width switches at run time (mixin of the QAT banks, which set `widths` and
    `shared` and say how many steps span the clipping range at a width, `span`).

    Per width: a learned step for each trained width (`log_steps`, a `WidthSteps`); an unseen width interpolates the
    trained clipping ranges (step x span). Shared: one learned clipping range (`log_range`) that each width divides
    into its own number of steps, so every width trains the same parameter.
    """

    widths: list[int]
    shared: bool

    def span(self, bits: int) -> int:
        raise NotImplementedError

    @property
    def reference_width(self) -> int:
        """The width whose searched step starts the shared range (the middle one)."""
        return self.widths[len(self.widths) // 2]

    def searched_widths(self) -> list[int]:
        """The widths whose steps `init_steps` needs."""
        return [self.reference_width] if self.shared else list(self.widths)

    def init_steps(self, steps: Mapping[int, torch.Tensor]) -> None:
        """Start from the Lp-searched steps of `searched_widths()`."""
        if self.shared:
            ref = self.reference_width
            self.log_range = nn.Parameter((steps[ref] * self.span(ref)).log())
        else:
            self.log_steps = WidthSteps({b: steps[b] for b in self.widths})

    def step(self, bits: int) -> torch.Tensor:
        """The step at `bits`; differentiable in the learned parameters."""
        if self.shared:
            return self.log_range.exp() / self.span(bits)
        if bits in self.widths:
            return self.log_steps.step(bits)
        return interpolate(bits, self.widths, lambda b: self.log_steps.step(b) * self.span(b)) / self.span(bits)
