"""The reconstruction loop's learning-rate schedule (QDrop/Genie anneal the step sizes, never the rounding)."""

import copy
import itertools

import pytest
import torch

import metaaug
from metaaug.errors import ConfigError
from metaaug.methods.configs import QDropConfig, RTNConfig
from metaaug.quant import QuantSpec
from metaaug.recon.engine import scale_scheduler


def _opt() -> torch.optim.Adam:
    groups = [{"params": [torch.zeros(2, requires_grad=True)], "lr": 1e-3, "name": "round"},
              {"params": [torch.zeros(1, requires_grad=True)], "lr": 4e-5, "name": "act_scale"},
              {"params": [torch.zeros(3, requires_grad=True)], "lr": 1e-4, "name": "weight_scale"}]
    return torch.optim.Adam(groups)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_cosine_anneals_the_steps_to_zero_and_keeps_rounding_constant(schedule):
    cfg = QDropConfig(iters=10, scale_schedule=schedule)
    opt = _opt()
    sched = scale_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.iters):
        opt.step()
        if sched is not None:  # the constant schedule needs no scheduler
            sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    assert all(row[0] == 1e-3 for row in lrs)
    if schedule == "constant":
        assert lrs[-1][1:] == [4e-5, 1e-4]
    else:
        assert lrs[4][1] == pytest.approx(4e-5 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 10)).item()))
        assert lrs[-1][1] == pytest.approx(0.0, abs=1e-12) and lrs[-1][2] == pytest.approx(0.0, abs=1e-12)
        assert all(a[1] > b[1] for a, b in itertools.pairwise(lrs))


def test_unknown_schedule_is_a_one_line_error():
    with pytest.raises(ConfigError, match="scale_schedule must be one of constant, cosine"):
        QDropConfig(scale_schedule="linear")


def test_qdrop_learns_weight_steps_and_the_paper_recipe_keeps_them(tiny_net):
    """The default QDrop moves the per-channel weight steps off their Lp-searched start; `paper()` leaves them."""
    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(wbits=2, abits=4)

    def steps(cfg) -> list[torch.Tensor]:
        q = metaaug.quantize(copy.deepcopy(tiny_net), images, cfg, spec, device="cpu")
        return [layer.wq.scale.detach().clone() for layer in q.quant_layers()]

    start = steps(RTNConfig())
    assert QDropConfig().lr_weight_scale > 0 and QDropConfig.paper().lr_weight_scale == 0
    for a, b in zip(start, steps(QDropConfig.paper(iters=20, batch_size=16)), strict=True):
        assert torch.equal(a, b)
    moved = [not torch.equal(a, b) for a, b in zip(start, steps(QDropConfig(iters=20, batch_size=16)), strict=True)]
    assert all(moved)


def test_fixed_augmentation_reconstructs_on_seeded_views_of_each_image(tiny_net):
    """`aug_views=K` trains every unit on the images plus K shift/flip views of each, the same views for a seed."""
    from metaaug.quant import prepare
    from metaaug.recon.engine import Reconstructor

    images = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sizes = []

    class Recording(Reconstructor):
        def optimize(self, k, name, unit, data):
            sizes.append(data.size)
            return super().optimize(k, name, unit, data)

    eng = Recording(prepare(copy.deepcopy(tiny_net), QuantSpec(2, 4)), QDropConfig(iters=2, aug_views=3), seed=1)
    eng.run(images)
    assert set(sizes) == {24}
    views = eng.with_views(images)
    assert torch.equal(views[:6], images) and torch.equal(views, eng.with_views(images))
    assert sum(not torch.equal(v, images[i % 6]) for i, v in enumerate(views[6:])) > 9
    assert Reconstructor(eng.qmodel, QDropConfig(), seed=1).with_views(images) is images
    with pytest.raises(ConfigError, match="aug_views must be >= 0"):
        QDropConfig(aug_views=-1)


def test_first_iteration_is_timed_apart_from_the_steady_state(tiny_net):
    """A compiled fake-quant pays its compile in the first step; the report keeps that out of the steady ms/iteration."""
    from metaaug.quant import prepare
    from metaaug.recon.engine import Reconstructor

    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cfg = QDropConfig(iters=4, batch_size=8, compile_fake_quant=True)
    stats = Reconstructor(prepare(copy.deepcopy(tiny_net), QuantSpec(2, 4)), cfg).run(images)
    timed = [s for s in stats if s.iters]
    assert timed
    for s in timed:
        first, steady = s.extra["first_iter_ms"], s.extra["steady_ms_per_iter"]
        assert s.ms_per_iter == pytest.approx((first + 3 * steady) / 4, abs=0.01)
        assert s.ms_per_iter * s.iters <= 1000 * s.seconds + 1  # both are rounded to the millisecond
    assert max(s.extra["first_iter_ms"] for s in timed) > 2 * max(s.extra["steady_ms_per_iter"] for s in timed)
    rtn = Reconstructor(prepare(copy.deepcopy(tiny_net), QuantSpec(2, 4)), QDropConfig(iters=1)).run(images)
    assert all("steady_ms_per_iter" not in s.extra for s in rtn)


def test_compiled_fake_quant_without_a_compiler_is_refused_before_the_run(tiny_net, monkeypatch):
    """torch.compile on the CPU needs a C++ compiler: its absence is one line up front, not a traceback mid-run."""
    from metaaug.quant import grids, prepare
    from metaaug.recon.engine import Reconstructor

    qm = prepare(copy.deepcopy(tiny_net), QuantSpec(2, 4))
    monkeypatch.setattr(grids.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="compile_fake_quant on the CPU needs a C\\+\\+ compiler"):
        Reconstructor(qm, QDropConfig(iters=1, compile_fake_quant=True))
    Reconstructor(qm, QDropConfig(iters=1))  # nothing to compile: no compiler needed
    Reconstructor(qm, QDropConfig(iters=1, compile_fake_quant=True), device="meta")  # not a CPU: Triton's job
