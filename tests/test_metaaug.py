"""MetaAug: the meta-gradient reaches T, T starts at the identity, and a short run writes what it should."""

import json
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import TinyNet, randomize_bn
from metaaug.cli.app import app
from metaaug.errors import ConfigError, DataError
from metaaug.methods.meta_losses import margin, pkt
from metaaug.methods.metaaug import MetaAugConfig, MetaAugReconstructor, spread_positions
from metaaug.methods.transform import TransformNet
from metaaug.quant import QuantSpec, prepare

runner = CliRunner()


def probe(model, images, inner, k=1, **cfg):
    q = prepare(model, QuantSpec(2, 2))
    eng = MetaAugReconstructor(q, MetaAugConfig(inner_optimizer=inner, meta_batch=16, **cfg), seed=0)
    return eng.gradient_probe(images, k)


def test_validation_gradient_reaches_t_and_dwarfs_fresh_adam():
    torch.manual_seed(0)
    model, x = randomize_bn(TinyNet()), torch.randn(64, 1, 28, 28)
    sgd, adam = probe(model, x, "sgd"), probe(model, x, "adam_fresh")
    assert sgd["kl"] > 0
    assert sgd["kl"] >= 100 * adam["kl"], (sgd, adam)


def test_validation_gradient_on_trained_resnet20(resnet20, calib256):
    sgd = probe(resnet20, calib256.images[:64], "sgd", k=2)
    adam = probe(resnet20, calib256.images[:64], "adam_fresh", k=2)
    assert sgd["kl"] > 0 and sgd["kl"] >= 100 * adam["kl"], (sgd, adam)


def test_transform_is_identity_at_init():
    t = TransformNet(1, 8)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(t(x), x)
    t3 = TransformNet(3, 8)
    x3 = torch.randn(2, 3, 31, 17)  # odd sizes: skips are resized
    assert torch.equal(t3(x3), x3)


def test_t_conditioned_on_the_block_starts_shared_and_learns_one_modulation_per_meta_unit():
    x = torch.randn(4, 1, 28, 28)
    t = TransformNet(1, 8, units=3)
    assert torch.equal(t(x, 0), x) and torch.equal(t(x, 2), x)
    with pytest.raises(ValueError, match="give the unit index"):
        t(x)
    torch.manual_seed(0)
    q = prepare(randomize_bn(TinyNet()), QuantSpec(2, 2))
    eng = MetaAugReconstructor(q, MetaAugConfig(iters=2, meta_iters=3, meta_batch=4, lr_t=1e-2, t_per_unit=True), seed=0)
    eng.run(torch.randn(6, 1, 28, 28))
    film = eng.tnet.film.detach()
    assert film.shape[0] == len(q.unit_names)
    assert [bool(film[k].abs().sum() > 0) for k in range(len(q.unit_names))] == [
        k in eng.meta_units for k in range(len(q.unit_names))]  # stem and head take no meta steps: their rows stay 0
    first, second = eng.meta_units[:2]
    assert not torch.equal(eng.tnet(x, first), eng.tnet(x, second))


def test_margin_is_zero_once_t_moves_x_by_more_than_eps():
    x = torch.zeros(4, 1, 8, 8)
    assert float(margin(x + 0.5, x, eps=0.1)) == 0.0  # mean squared change 0.25 > 0.1
    assert float(margin(x + 0.1, x, eps=0.1)) == pytest.approx(0.09)
    assert float(margin(x, x, eps=0.1)) == pytest.approx(0.1)


def test_pkt_is_zero_for_identical_features_and_positive_otherwise():
    f = torch.randn(8, 16)
    assert float(pkt(f, f)) == pytest.approx(0.0, abs=1e-6)
    assert float(pkt(torch.randn(8, 16), f)) > 0


def test_bad_metaaug_options_are_named():
    with pytest.raises(ConfigError, match="inner_optimizer"):
        MetaAugConfig(inner_optimizer="lbfgs")
    with pytest.raises(ConfigError, match="unknown MetaAug loss term"):
        MetaAugConfig(terms=("kl", "typo"))
    with pytest.raises(ConfigError, match="unknown MetaAug loss term"):
        MetaAugConfig(terms="kl+typo")
    assert MetaAugConfig(terms="kl+pkt").terms == ("kl", "pkt")  # the ablation's variant syntax
    with pytest.raises(ConfigError, match="val_views"):
        MetaAugConfig(val_views=-1)
    with pytest.raises(ConfigError, match="meta_schedule must be one of"):
        MetaAugConfig(meta_schedule="after")
    with pytest.raises(ConfigError, match="needs reconstruction steps"):
        MetaAugConfig(meta_schedule="spread", iters=0)
    with pytest.raises(ConfigError, match="inner_steps"):
        MetaAugConfig(inner_steps=0)


def test_a_lookahead_of_several_inner_steps_still_sends_validation_gradient_to_t():
    torch.manual_seed(0)
    model, x = randomize_bn(TinyNet()), torch.randn(64, 1, 28, 28)
    one, three = probe(model, x, "sgd"), probe(model, x, "sgd", inner_steps=3)
    assert three["kl"] > 0 and three["kl"] != one["kl"], (one, three)


def test_spread_meta_steps_fall_through_reconstruction_and_rerender_the_transformed_images():
    assert spread_positions(4, 20) == [0, 5, 10, 15]
    assert spread_positions(30, 10) == list(range(10))  # at most one meta step per reconstruction step
    assert spread_positions(0, 10) == [] and spread_positions(3, 0) == []

    class Recording(MetaAugReconstructor):
        def during(self, k, it, unit, data):
            time.sleep(0.02)  # makes the time in this hook measurable against the reconstruction steps
            out = super().during(k, it, unit, data)
            probs = {aq.quant_prob for aq in self.qmodel.act_quantizers(unit)}
            self.seen.append((k, it, out.q_in[0][-6:].clone(), probs))
            return out

    torch.manual_seed(0)
    q = prepare(randomize_bn(TinyNet()), QuantSpec(2, 2))
    cfg = MetaAugConfig(iters=8, meta_iters=4, meta_schedule="spread", log_every=1, meta_batch=4, lr_t=1e-2)
    eng = Recording(q, cfg, seed=0)
    eng.seen = []
    stats = eng.run(torch.randn(6, 1, 28, 28))
    assert [m["meta_iters"] for m in eng.meta_log] == [4, 4]  # both residual blocks; stem and head skip the meta phase
    for s, m in zip([s for s in stats if s.name in ("block1", "block2")], eng.meta_log, strict=True):
        assert s.extra["meta_seconds"] >= max(m["meta_seconds"], 8 * 0.02)  # spread meta steps count as meta time
    for s in stats:  # ... and not as reconstruction time
        assert s.ms_per_iter * s.iters / 1000 + s.extra["meta_seconds"] <= s.seconds + 1e-3
        assert s.ms_per_iter < 20, s
    for name in ("block1", "block2"):
        assert [c["step"] for c in eng.curves[name]] == [0, 2, 4, 6]
    k = q.unit_names.index("block1")
    rows = {it: t for kk, it, t, _ in eng.seen if kk == k}
    assert not torch.equal(rows[1], rows[2]) and torch.equal(rows[2], rows[3])  # T(x) re-rendered after each meta step
    assert all(p == {cfg.quant_prob} for kk, _, _, p in eng.seen if kk == k)  # QDrop's dropping restored after each
    assert eng.spread is None and len(eng.snapshots) == 3
    cfg0 = MetaAugConfig(iters=2, meta_iters=0, meta_schedule="spread")
    none = MetaAugReconstructor(prepare(randomize_bn(TinyNet()), QuantSpec(2, 2)), cfg0, seed=0)
    none.run(torch.randn(6, 1, 28, 28))
    assert [m["meta_iters"] for m in none.meta_log] == [0, 0]


def test_validation_views_are_seeded_shifted_copies_and_off_by_default():
    images = torch.randn(6, 1, 12, 12)
    q = prepare(TinyNet(), QuantSpec(2, 2))
    plain = MetaAugReconstructor(q, MetaAugConfig(), seed=0)
    val, name = plain.validation_images(images, torch.Generator().manual_seed(0))
    assert name == "calib" and val is images
    eng = MetaAugReconstructor(q, MetaAugConfig(val_views=4), seed=0)
    a, name = eng.validation_images(images, torch.Generator().manual_seed(0))
    b, _ = eng.validation_images(images, torch.Generator().manual_seed(0))
    assert name == "calib-views-4" and a.shape == (24, 1, 12, 12) and torch.equal(a, b)
    changed = [not torch.equal(v, images[i % 6]) for i, v in enumerate(a)]
    assert sum(changed) > 12  # most views are shifted or flipped (a zero shift without a flip is the image itself)


def test_validation_on_a_synthetic_folder_replaces_calib_and_holdout_and_checks_the_folder(tmp_path):
    images = torch.randn(6, 1, 12, 12)
    syn = torch.randn(5, 1, 12, 12)
    save_file({"images": syn, "labels": torch.arange(5)}, str(tmp_path / "images.safetensors"))
    q = prepare(TinyNet(), QuantSpec(2, 2))
    eng = MetaAugReconstructor(q, MetaAugConfig(val_synth=str(tmp_path)), seed=0, holdout_images=images[:2])
    val, name = eng.validation_images(images, torch.Generator().manual_seed(0))
    assert name == "synthetic" and torch.equal(val, syn)
    with pytest.raises(DataError, match="val_synth images are"):
        eng.validation_images(torch.randn(6, 1, 10, 10), torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="does not exist"):
        MetaAugConfig(val_synth=str(tmp_path / "missing"))


def run_metaaug(out, data, seed=0, meta_iters=3):
    args = ["quantize", "--method", "metaaug", "--wbits", "2", "--abits", "2", "--calib-size", "80", "--iters", "4",
            "--meta-iters", str(meta_iters), "--holdout", "0.2", "--seed", str(seed), "--data-dir", str(data),
            "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text())


def test_short_metaaug_run_writes_report_and_pngs_and_is_reproducible(tmp_path, small_data):
    a = run_metaaug(tmp_path / "a", small_data)
    for key in ("holdout_top1", "meta_seconds", "recon_seconds", "meta_units", "quant_top1", "calib_top1"):
        assert key in a
    assert a["validation"] == "holdout" and a["calib_size"] == 80
    unit = a["meta_units"][0]
    for key in ("kl", "margin", "pkt", "grad_kl", "meta_iters", "ms_per_meta_iter"):
        assert key in unit
    assert len(a["meta_units"]) == 9  # 9 blocks; first conv and last linear skip the meta phase
    for png in ("transforms.png", "meta_losses.png"):
        assert (tmp_path / "a" / png).stat().st_size > 1000
    b = run_metaaug(tmp_path / "b", small_data)
    assert (a["quant_top1"], a["calib_top1"], a["holdout_top1"]) == (b["quant_top1"], b["calib_top1"], b["holdout_top1"])
    assert [u["kl"] for u in a["meta_units"]] == [u["kl"] for u in b["meta_units"]]


def test_metaaug_without_meta_steps_runs_and_skips_the_loss_plot(tmp_path, small_data):
    rep = run_metaaug(tmp_path, small_data, meta_iters=0)  # the ablation's identity control: T stays x + 0
    assert rep["meta_seconds"] == 0 and all(u["meta_iters"] == 0 for u in rep["meta_units"])
    assert (tmp_path / "transforms.png").exists() and not (tmp_path / "meta_losses.png").exists()
