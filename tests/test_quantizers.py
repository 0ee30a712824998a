import copy

import pytest
import torch

from metaaug.errors import ConfigError
from metaaug.quant.quantizers import ActQuantizer, WeightQuantizer, lp_search_channel, lsq_fake_quant
from metaaug.recon.loss import beta_at


def make_wq(bits=4, shape=(6, 3, 3, 3), seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape)
    wq = WeightQuantizer(bits, shape[0], len(shape))
    wq.init_scale(w)
    return w, wq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_weights_lie_on_the_per_channel_grid(bits):
    w, wq = make_wq(bits)
    q = wq(w)
    ints = q / wq.scale + wq.zero_point
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert ints.min() >= -1e-4 and ints.max() <= 2**bits - 1 + 1e-4
    # per channel: every channel has its own scale
    assert wq.scale.flatten().unique().numel() == w.shape[0]


def test_lp_search_beats_full_range_at_2_bits():
    torch.manual_seed(0)
    w = torch.randn(8, 100)
    s, z = lp_search_channel(w, 2)
    full = (w.max(1).values - w.min(1).values) / 3
    assert (s < full).all(), "clipping should shrink the 2-bit range for Gaussian weights"
    err_search = (((w / s[:, None]).round() + z[:, None]).clamp(0, 3) - z[:, None]) * s[:, None] - w
    zf = (-w.min(1).values / full).round()
    err_full = (((w / full[:, None]).round() + zf[:, None]).clamp(0, 3) - zf[:, None]) * full[:, None] - w
    assert err_search.abs().pow(2.4).sum() < err_full.abs().pow(2.4).sum()


def test_adaround_starts_at_fp_weights_and_hardens_to_grid():
    w, wq = make_wq(4)
    w = w * 0.3  # keep inside the clipped range so soft init reproduces w exactly
    wq.init_scale(w)
    wq.scale.data *= 2
    wq.init_rounding(w)
    soft = wq(w)
    inside = (w / wq.scale + wq.zero_point > 0.01) & (w / wq.scale + wq.zero_point < 14.99)
    assert torch.allclose(soft[inside], w[inside], atol=1e-3)
    wq.harden()
    hard = wq(w)
    ints = hard / wq.scale + wq.zero_point
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    # hard rounding picks floor or ceil of w/s, never further away
    assert ((hard - w).abs() <= wq.scale + 1e-5).all()


def test_rounding_penalty_is_zero_at_binary_h_and_positive_between():
    _, wq = make_wq(3)
    w = torch.randn(6, 3, 3, 3)
    wq.init_rounding(w)
    wq.alpha.data.fill_(10.0)  # h -> 1
    assert float(wq.round_penalty(2.0).detach()) == pytest.approx(0.0, abs=1e-6)
    wq.alpha.data.fill_(0.0)  # h = 0.5
    assert float(wq.round_penalty(2.0).detach()) == pytest.approx(wq.alpha.numel(), rel=1e-5)


def test_rounding_penalty_gradient_reaches_alpha():
    w, wq = make_wq(2)
    wq.init_rounding(w)
    wq.round_penalty(2.0).backward()
    assert wq.alpha.grad is not None and wq.alpha.grad.abs().sum() > 0


def test_beta_schedule_warms_up_then_anneals_20_to_2():
    assert beta_at(0, 1000, 0.2) is None and beta_at(199, 1000, 0.2) is None
    assert beta_at(200, 1000, 0.2) == pytest.approx(20.0)
    assert beta_at(999, 1000, 0.2) == pytest.approx(2.0, abs=0.05)


def test_lsq_gradients_match_the_ste_formula():
    torch.manual_seed(0)
    x = (torch.randn(200) * 2).requires_grad_(True)
    s = torch.tensor([0.3], requires_grad=True)
    g = torch.randn(200)
    (lsq_fake_quant(x, s, -2, 1) * g).sum().backward()
    # reference: straight-through round, autograd through clamp
    x2, s2 = x.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    xs = x2 / s2
    ref = (xs + (xs.round() - xs).detach()).clamp(-2, 1) * s2
    (ref * g).sum().backward()
    assert torch.allclose(x.grad, x2.grad)
    assert torch.allclose(s.grad, s2.grad, atol=1e-5)


def test_act_quantizer_unsigned_after_relu_and_signed_otherwise():
    aq = ActQuantizer(4)
    aq.init_from(torch.rand(1000))
    assert not bool(aq.signed) and aq.bounds == (0, 15)
    aq.init_from(torch.randn(1000))
    assert bool(aq.signed) and aq.bounds == (-8, 7)
    aq.enabled = True
    y = aq(torch.randn(1000))
    assert (y / aq.scale).round().unique().numel() <= 16


class CountingBool(torch.Tensor):
    reads = 0

    def __bool__(self) -> bool:
        CountingBool.reads += 1
        return super().__bool__()


def test_the_signed_flag_is_read_from_the_device_once_and_again_only_after_it_changes():
    aq = ActQuantizer(4)
    aq.init_from(torch.rand(1000))  # non-negative: unsigned
    aq.enabled = True
    x = torch.linspace(-2, 2, 101)
    aq.signed = torch.tensor(False).as_subclass(CountingBool)
    CountingBool.reads = 0
    for _ in range(5):
        assert float(aq(x).min()) == 0.0  # unsigned: negative inputs clip to 0
    assert CountingBool.reads == 1  # on a GPU each read is a host sync
    aq.signed = torch.tensor(True)  # a new tensor (as `.to()` makes) is read afresh
    assert float(aq(x).min()) < 0
    aq.signed.fill_(False)  # so is an in-place write
    assert float(aq(x).min()) == 0.0
    aq.signed.fill_(True)
    assert float(aq(x).min()) < 0
    aq.load_state_dict({**aq.state_dict(), "signed": torch.tensor(False)})
    assert float(aq(x).min()) == 0.0
    twin = copy.deepcopy(aq)
    twin.signed.fill_(True)
    assert float(twin(x).min()) < 0 and float(aq(x).min()) == 0.0


def test_qdrop_mixes_quantized_and_fp_values_with_probability_p():
    torch.manual_seed(0)
    aq = ActQuantizer(2)
    x = torch.rand(20000) * 3
    aq.init_from(x)
    aq.enabled, aq.quant_prob = True, 0.5
    q = lsq_fake_quant(x, aq.scale.detach(), 0, 3)
    y = aq(x)
    differs = q != x
    took_q = (y == q) & differs
    frac = took_q.sum() / differs.sum()
    assert 0.45 < float(frac) < 0.55
    assert ((y == q) | (y == x)).all()


def test_keep_mask_unpacks_random_bytes_least_significant_bit_first():
    from metaaug.quant.grids import keep_mask

    cpu, shape = torch.device("cpu"), (5, 13)  # 65 elements: 9 bytes, the last one partly used
    torch.manual_seed(3)
    raw = torch.randint(0, 256, (9,))
    expect = ((raw.unsqueeze(1) >> torch.arange(8)) & 1).flatten()[:65].view(shape)
    for dtype in (torch.float32, torch.bool):
        torch.manual_seed(3)
        mask = keep_mask(torch.Size(shape), 0.5, cpu, dtype)
        assert mask.dtype == dtype and torch.equal(mask, expect.to(dtype))
    assert 0.45 < float(keep_mask(torch.Size((100, 100)), 0.5, cpu).mean()) < 0.55


@pytest.mark.parametrize("bad", [1, 9, 0, 2.5, "4"])
def test_bits_outside_2_to_8_are_rejected(bad):
    with pytest.raises(ConfigError, match=r"2\.\.8"):
        WeightQuantizer(bad, 4, 4)
    with pytest.raises(ConfigError, match=r"2\.\.8"):
        ActQuantizer(bad)


def test_compiled_fake_quant_gives_the_eager_outputs_and_restores_eager_after():
    from metaaug.quant import grids

    torch.manual_seed(0)
    x0, s0 = torch.randn(4, 8, 6, 6) * 2, torch.tensor(0.3)
    mask = grids.keep_mask(x0.shape, 0.5, x0.device)
    results = []
    for compiled in (False, True):
        x, s = x0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        with grids.compiled_fake_quant(compiled):
            y = grids._grid_node(x, s, mask, "uniform", -8, 7)
        (y * x0).sum().backward()
        results.append((y.detach(), x.grad, s.grad))
    (y_e, gx_e, gs_e), (y_c, gx_c, gs_c) = results
    assert torch.equal(y_e, y_c) and torch.equal(gx_e, gx_c)
    assert torch.allclose(gs_e, gs_c, rtol=1e-4)
    assert grids._grid_node == grids._GridFakeQuant.apply


def test_bf16_compute_runs_layers_in_bf16_and_quantizes_in_float32():
    from metaaug.recon.config import ReconConfig
    from metaaug.recon.engine import compute_context

    conv, aq = torch.nn.Conv2d(3, 4, 3), ActQuantizer(4)
    x = torch.rand(2, 3, 8, 8)
    aq.init_from(conv(x).detach())
    aq.enabled = True
    with compute_context(torch.device("cpu"), ReconConfig(compute_dtype="bfloat16")):
        h = conv(x)
        y = aq(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    with compute_context(torch.device("cpu"), ReconConfig()):
        assert conv(x).dtype == torch.float32
