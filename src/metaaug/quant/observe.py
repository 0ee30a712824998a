"""Observation: run a model once with activation quantizers recording their inputs (like Brevitas'
`calibration_mode`), then start each quantizer from what it saw, or hand the samples to whoever keeps its own steps
(the QAT banks, MetaQuantNet, the sensitivity baseline)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from metaaug.quant.quantizers import ActQuantizer

OBSERVE_VALUES = 262_144  # values kept per observed batch for the step-size search


def subsample(x: torch.Tensor) -> torch.Tensor:
    """About `OBSERVE_VALUES` evenly strided values of one observed batch: enough for the step search, and bounded
    so observing large activations costs little memory."""
    return x.detach().flatten()[:: max(1, x.numel() // OBSERVE_VALUES)]


@contextlib.contextmanager
def observing(quantizers: Iterable[ActQuantizer], init: bool = True) -> Iterator[dict[ActQuantizer, torch.Tensor]]:
    """Inside the block the quantizers pass their inputs through unchanged and record a sample of each batch.

    On leaving, the yielded dict is filled with each quantizer's sample (the batches concatenated; quantizers that
    saw nothing are left out) and, with `init`, each is Lp-initialised from it (`ActQuantizer.init_from`). If the
    block raises, the quantizers just stop observing.
    """
    qs = list(quantizers)
    samples: dict[ActQuantizer, torch.Tensor] = {}
    for q in qs:
        q.start_observing()
    try:
        yield samples
    except BaseException:
        for q in qs:
            q.stop_observing()
        raise
    for q in qs:
        sample = q.stop_observing()
        if sample is not None:
            samples[q] = sample
            if init:
                q.init_from(sample)
