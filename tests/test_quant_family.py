"""The quantizer family in `metaaug.quant`: grids, the log2 grid, observation, per-width step tables."""

import math

import pytest
import torch
from torch import nn

from metaaug.errors import ConfigError
from metaaug.qat.switchable import ActBank, WeightBank
from metaaug.quant.grids import act_bounds, act_fake_quant, log2_fake_quant, lsq_fake_quant, rtn_fake_quant
from metaaug.quant.lp import act_step, lp_search_channel, lp_search_log2, lp_search_tensor
from metaaug.quant.observe import OBSERVE_VALUES, observing
from metaaug.quant.quantizers import ActQuantizer, WeightQuantizer
from metaaug.quant.steps import WidthSteps
from metaaug.search.sensitivity import _rtn_delta


@pytest.mark.parametrize(("bits", "signed", "expected"), [(2, False, (0, 3)), (4, False, (0, 15)), (8, False, (0, 255)),
                                                          (2, True, (-2, 1)), (4, True, (-8, 7)), (8, True, (-128, 127))])
def test_act_bounds(bits, signed, expected):
    assert act_bounds(bits, signed) == expected
    aq = ActQuantizer(bits)
    aq.signed.fill_(signed)
    assert aq.bounds == expected


# log2 grid


def test_log2_levels_are_powers_of_two_of_the_step():
    s = torch.tensor([0.5])
    x = 0.5 * torch.tensor([1.0, 0.5, 0.25, 0.125, 2.0**-7, 2.0**-15, 0.6, 0.3])
    y = log2_fake_quant(x, s, 4)
    assert torch.equal(y, 0.5 * torch.tensor([1.0, 0.5, 0.25, 0.125, 2.0**-7, 0.0, 0.5, 0.25]))  # code 15 means zero


def test_log2_values_above_the_step_clip_to_it():
    y = log2_fake_quant(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0]), 3)
    assert torch.equal(y, torch.ones(3))


def test_log2_tiny_and_zero_inputs_quantize_to_zero():
    s = torch.tensor([1.0])
    # 3 bits: codes 0..7, code 7 means zero, so the last level is 2^-6; round(-log2 x) = 7 or more is zero
    x = torch.tensor([2.0**-6, 2.0**-7, 2.0**-9, 1e-30, 0.0, -0.1])
    y = log2_fake_quant(x, s, 3)
    assert torch.equal(y, torch.tensor([2.0**-6, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_log2_grid_takes_at_most_2_to_the_b_values_zero_included(bits):
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(64, 50) * 3, -1)
    y = log2_fake_quant(x, torch.tensor([1.0]), bits)
    levels = {2.0**-q for q in range(2**bits - 1)} | {0.0}
    assert set(y.unique().tolist()) <= levels


def _log2_reference(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """The written formula, with the straight-through estimator on the grid map: identity inside the range."""
    top = 2**bits - 1
    v = x / s
    r = torch.round(-torch.log2(v.detach().clamp(min=1e-45)))
    level = torch.where(r >= top, torch.zeros_like(v), 2.0 ** (-r.clamp(0, top - 1)))
    inside = (r >= 0) & (r < top) & (x > 0)
    return s * torch.where(inside, v + (level - v).detach(), level)


def test_log2_gradients_match_autograd_of_the_formula():
    torch.manual_seed(0)
    x = torch.cat([torch.rand(300) * 0.7, torch.tensor([0.0, 1e-9, 0.9, 1.5])]).requires_grad_(True)
    s = torch.tensor([0.6], requires_grad=True)
    g = torch.randn(x.shape)
    (log2_fake_quant(x, s, 3) * g).sum().backward()
    x2, s2 = x.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    ref = _log2_reference(x2, s2, 3)
    assert torch.equal(ref.detach(), log2_fake_quant(x.detach(), s.detach(), 3))
    (ref * g).sum().backward()
    assert torch.allclose(x.grad, x2.grad)
    assert torch.allclose(s.grad, s2.grad, atol=1e-5)
    # straight-through in x inside the range, no gradient where clipped to s or quantized to 0
    inside = (x.detach() > 0.6 * 2**-6.5) & (x.detach() < 0.6 * 2**0.5)
    assert torch.equal(x.grad[inside], g[inside]) and (x.grad[~inside] == 0).all()


def test_log2_step_gradient_matches_finite_differences_outside_the_range():
    # clipped values are s itself (d/ds = 1), zeroed ones stay 0: there the forward is differentiable
    x = torch.tensor([0.95, 1.2, 2.0, 1e-6])
    s = torch.tensor([0.5], requires_grad=True)
    log2_fake_quant(x, s, 2).sum().backward()
    eps = 1e-3
    fd = (log2_fake_quant(x, s.detach() + eps, 2).sum() - log2_fake_quant(x, s.detach() - eps, 2).sum()) / (2 * eps)
    assert float(s.grad) == pytest.approx(float(fd), rel=1e-3)
    assert float(s.grad) == pytest.approx(3.0)


def test_log2_step_gradient_is_lsq_style_inside_the_range():
    # inside, d x_hat / d s = (x_hat - x) / s, the LSQ step gradient
    x = torch.tensor([0.3, 0.2, 0.07])
    s = torch.tensor([1.0], requires_grad=True)
    y = log2_fake_quant(x, s, 4)
    y.sum().backward()
    assert float(s.grad) == pytest.approx(float((y.detach() - x).sum()), rel=1e-5)


def test_log2_quantizer_with_qdrop_keeps_fp_or_quantized_values():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(200, 100), -1)
    aq = ActQuantizer(3, grid="log2")
    aq.init_from(x)
    aq.enabled, aq.quant_prob = True, 0.5
    q = log2_fake_quant(x, aq.scale.detach(), 3)
    y = aq(x)
    differs = q != x
    frac = ((y == q) & differs).sum() / differs.sum()
    assert 0.45 < float(frac) < 0.55
    assert ((y == q) | (y == x)).all()


def test_log2_search_picks_one_for_softmax_and_beats_the_max():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(256, 64) * 4, -1)
    s = lp_search_log2(x, 3)
    err = float((log2_fake_quant(x.flatten(), s, 3) - x.flatten()).abs().pow(2.4).mean())
    for other in (x.max().reshape(1), torch.tensor([0.05])):
        assert err <= float((log2_fake_quant(x.flatten(), other, 3) - x.flatten()).abs().pow(2.4).mean())
    # probabilities of 0.97 and powers of two: the best top level is 1, which no ratio of the maximum gives
    x = torch.tensor([0.97] * 10 + [0.5, 0.25, 0.125] * 100)
    assert float(lp_search_log2(x, 2)) == 1.0


def test_log2_quantizer_rejects_signed_tensors_and_unknown_grids():
    with pytest.raises(ConfigError, match="non-negative"):
        ActQuantizer(4, grid="log2").init_from(torch.randn(100))
    with pytest.raises(ConfigError, match="grid"):
        ActQuantizer(4, grid="log")


def test_grid_is_shown_in_the_repr():
    assert "grid=uniform" in repr(ActQuantizer(4))
    assert "grid=log2" in repr(ActQuantizer(4, grid="log2"))


# uniform grid unchanged


def _old_lsq(x, s, lo, hi):
    xs = x / s
    return xs.round().clamp(lo, hi) * s


@pytest.mark.parametrize("signed", [False, True])
def test_uniform_quantizer_is_unchanged(signed):
    torch.manual_seed(1)
    x = torch.randn(5000) if signed else torch.rand(5000) * 3
    aq = ActQuantizer(4)
    aq.init_from(x)
    lo, hi = act_bounds(4, signed)
    assert bool(aq.signed) == signed
    assert torch.equal(aq.scale.data, lp_search_tensor(x, lo, hi))
    aq.enabled = True
    assert torch.equal(aq(x), _old_lsq(x, aq.scale.detach(), lo, hi))
    assert torch.equal(act_fake_quant(x, aq.scale.detach(), 4, signed, "uniform"), lsq_fake_quant(x, aq.scale.detach(), lo, hi))


def test_one_weight_rtn_function_everywhere():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    for bits in (2, 4, 8):
        s, z = lp_search_channel(w, bits)
        s4, z4 = s.view(-1, 1, 1, 1), z.view(-1, 1, 1, 1)
        old = ((w / s4).round() + z4).clamp(0, 2**bits - 1)
        old = (old - z4) * s4
        assert torch.equal(rtn_fake_quant(w, s4, z4, bits), old)
        wq = WeightQuantizer(bits, 8, 4)
        wq.init_scale(w)
        assert torch.equal(wq(w), old)
        bank = WeightBank(w, [bits], shared=False)
        bank.bits = bits
        assert torch.allclose(bank(w), old, atol=1e-6)
        # the sensitivity baseline's delta: plain `.round()` there, round-STE now, forward-identical
        w2 = w.reshape(8, -1)
        q = ((w2 / s[:, None]).round() + z[:, None]).clamp(0, 2**bits - 1)
        assert torch.equal(_rtn_delta(w, bits), (((q - z[:, None]) * s[:, None]) - w2).reshape(w.shape))


# observation


class _TwoActs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = ActQuantizer(4), ActQuantizer(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) * 2)


def test_observing_context_initialises_as_the_old_loop():
    torch.manual_seed(0)
    batches = [torch.randn(700, 600), torch.randn(300, 600)]  # more than OBSERVE_VALUES each: subsampled
    old, new = _TwoActs(), _TwoActs()
    for aq in (old.a, old.b):
        aq.observing = True
    for x in batches:
        old(x)
    for aq in (old.a, old.b):
        aq.finish_observing()
    with observing([new.a, new.b]) as samples:
        for x in batches:
            new(x)
    for o, n in ((old.a, new.a), (old.b, new.b)):
        assert torch.equal(o.scale, n.scale) and bool(o.signed) == bool(n.signed) and bool(n.initialized)
        assert not n.observing and n._observed == []
        manual = torch.cat([t.flatten()[:: max(1, t.numel() // OBSERVE_VALUES)] for t in
                            (batches if n is new.a else [torch.relu(x) * 2 for x in batches])])
        assert torch.equal(samples[n], manual)
    assert bool(new.a.signed) and not bool(new.b.signed)


def test_observing_without_init_hands_back_samples_and_leaves_quantizers_alone():
    net = _TwoActs()
    with observing([net.a, net.b], init=False) as samples:
        y = net(torch.randn(10, 10))
    assert set(samples) == {net.a, net.b} and samples[net.a].numel() == 100
    assert not bool(net.a.initialized) and float(net.a.scale) == 1.0
    assert torch.equal(y, torch.relu(samples[net.a].view(10, 10)) * 2)


def test_observing_stops_when_the_block_raises():
    net = _TwoActs()
    with pytest.raises(RuntimeError), observing([net.a, net.b]):
        net(torch.randn(4))
        raise RuntimeError("boom")
    assert not net.a.observing and net.a._observed == [] and not bool(net.a.initialized)


# banks and step tables


def test_act_bank_fixed_keeps_the_grid_and_matches_the_bank():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(32, 40) * 3, -1)
    for shared in (False, True):
        bank = ActBank(x.flatten(), [2, 4], shared, ["fc"], False, grid="log2")
        for bits in (2, 3, 4):
            aq = bank.fixed(bits)
            assert aq.grid == "log2" and "grid=log2" in repr(aq) and aq.consumers == ["fc"]
            bank.bits, aq.enabled = bits, True
            assert torch.equal(bank(x), aq(x))
        # log2's top level is s at every width: the shared range is the step itself
        if shared:
            assert torch.allclose(bank.scale(2), bank.scale(4))
    assert torch.equal(bank.fixed(4).scale, bank.scale(4).detach().reshape(1))
    uniform = ActBank(torch.rand(1000), [4], False, [], False)
    assert uniform.fixed(4).grid == "uniform"


def test_act_bank_starts_at_the_quantizer_steps():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(32, 40), -1).flatten()
    bank = ActBank(x, [3, 4], False, [], False, grid="log2")
    for bits in (3, 4):
        aq = ActQuantizer(bits, grid="log2")
        aq.init_from(x)
        assert torch.allclose(bank.scale(bits), aq.scale)
    assert torch.equal(act_step(x, 4, False, "uniform"), lp_search_tensor(x, 0, 15))


def test_bank_state_dict_keys_are_unchanged():
    w, x = torch.randn(4, 3, 3, 3), torch.randn(500)
    assert set(WeightBank(w, [2, 4], False).state_dict()) == {"log_steps.2", "log_steps.4", "zp2", "zp4"}
    assert set(WeightBank(w, [2, 4], True).state_dict()) == {"log_range", "low"}
    assert set(ActBank(x, [2, 4], False, [], False).state_dict()) == {"signed", "log_steps.2", "log_steps.4"}
    assert set(ActBank(x, [2, 4], True, [], False).state_dict()) == {"signed", "log_range"}
    # a state saved by the old ParameterDict loads
    bank = WeightBank(w, [2, 4], False)
    old = {"log_steps.2": torch.full((4, 1, 1, 1), math.log(0.1)), "log_steps.4": torch.full((4, 1, 1, 1), math.log(0.02)),
           "zp2": torch.ones(4, 1, 1, 1), "zp4": torch.ones(4, 1, 1, 1) * 7}
    bank.load_state_dict(old)
    assert torch.allclose(bank.qparams(2)[0], torch.full((4, 1, 1, 1), 0.1))


def test_relative_width_steps_start_exactly_at_the_searched_step():
    s = torch.rand(6, 1) + 0.01
    table = WidthSteps({2: s, 4: s / 5}, relative=True)
    assert torch.equal(table.step(2), s) and torch.equal(table.step(4), s / 5)
    assert table.widths == [2, 4] and set(table.state_dict()) == {"2", "4"}
    absolute = WidthSteps({3: s})
    assert torch.allclose(absolute.step(3), s) and torch.equal(absolute["3"].data, s.log())


def test_metaquant_reads_its_old_flat_state_keys():
    from metaaug.quant.prepare import QuantSpec, prepare
    from metaaug.search import MetaQuantConfig, MetaQuantNet

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 24 * 24, 10))
    images = torch.randn(8, 1, 28, 28)
    meta = MetaQuantNet(prepare(net, QuantSpec(4, 4), "layer"), images, (2, 4), (4,), [], MetaQuantConfig())
    state = meta.state_dict()
    for k in [k for k in state if k.startswith(("wscales.", "ascales."))]:
        assert k.count(".") >= 2
    with torch.no_grad():
        for p in meta.wscales.parameters():
            p.add_(0.1)
    flat = {}
    for k, v in meta.state_dict().items():
        if k.startswith(("wscales.", "ascales.")):
            table, rest = k.split(".", 1)
            name, bits = rest.rsplit(".", 1)
            flat[f"{table}.{name}_{bits}"] = v
        else:
            flat[k] = v
    fresh = MetaQuantNet(prepare(net, QuantSpec(4, 4), "layer"), images, (2, 4), (4,), [], MetaQuantConfig())
    fresh.load_state_dict(flat)
    for k, v in meta.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_metaquant_activation_steps_follow_the_quantizer_grid():
    from metaaug.quant.prepare import QuantSpec, prepare
    from metaaug.search import MetaQuantConfig, MetaQuantNet
    from metaaug.search.metaquant import _key

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 24 * 24, 10))
    q = prepare(net, QuantSpec(4, 4), "layer")
    images = torch.randn(8, 1, 28, 28)
    names = {}
    for name, aq in q.named_modules():
        if isinstance(aq, ActQuantizer) and aq.consumers and not aq.consumers[0].endswith("0"):
            aq.grid = "log2"  # a post-ReLU tensor: non-negative
            names[name] = aq
    assert names
    with observing(names.values(), init=False) as samples:
        q.set_quant(False, False)
        q(images)
    meta = MetaQuantNet(q, images, (2, 4), (3, 4), [], MetaQuantConfig())
    for name, aq in names.items():
        for bits in (3, 4):
            assert torch.allclose(meta.ascales[_key(name)].step(bits), lp_search_log2(samples[aq], bits))
