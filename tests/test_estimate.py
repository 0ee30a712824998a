"""The up-front estimate: per-unit time and cache memory before reconstruction, without touching the model."""

from __future__ import annotations

import copy

import torch

from metaaug.methods.configs import QDropConfig
from metaaug.quant.prepare import QuantSpec, prepare
from metaaug.recon.cache import parse_size
from metaaug.recon.engine import Reconstructor
from metaaug.recon.estimate import estimate


class Recording:
    """A progress that keeps what the engine tells it."""

    def __init__(self) -> None:
        self.plans, self.units = [], []

    def start(self, unit_names):
        pass

    def plan(self, est, cache_budget):
        self.plans.append((est, cache_budget))

    def unit_start(self, index, name, total):
        self.units.append(name)

    def advance(self, steps):
        pass

    def unit_end(self, index, stats):
        pass


def test_estimate_changes_nothing_and_covers_every_unit(resnet20, calib256):
    qm = prepare(copy.deepcopy(resnet20), QuantSpec(2, 4), "block")
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    est = estimate(qm, calib256.images[:64], 32, 100, torch.device("cpu"))
    assert [u.name for u in est.units] == list(qm.unit_names)
    assert all(u.ms_per_iter > 0 and u.cache_bytes > 0 for u in est.units)
    assert est.seconds == sum(u.ms_per_iter for u in est.units) * 100 / 1000
    assert all(torch.equal(before[k], v) for k, v in qm.state_dict().items())
    assert all(p.grad is None for p in qm.parameters())
    skipped = estimate(qm, calib256.images[:64], 32, 100, torch.device("cpu"), skip=3)
    assert [u.name for u in skipped.units] == list(qm.unit_names)[3:]


def test_the_engine_plans_before_the_first_unit_and_the_cache_estimate_is_close(resnet20, calib256):
    qm = prepare(copy.deepcopy(resnet20), QuantSpec(2, 4), "block")
    progress = Recording()
    engine = Reconstructor(qm, QDropConfig(iters=2), progress=progress)
    engine.run(calib256.images[:64])
    (est, budget), = progress.plans
    assert budget == engine.cache.budget
    report = engine.engine_report()
    measured = parse_size(report["cache"]["peak_memory"].replace(" ", ""))
    assert 0.5 < est.cache_peak / measured < 2.0, (est.cache_peak, measured)
    assert report["estimate"]["recon_seconds"] == round(est.seconds, 1)
