"""FDDA synthetic calibration data: BNS losses, generator training, saving, and `--calib-source` through the CLI."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from metaaug.cli.app import app
from metaaug.data.datasets import FASHION_MNIST_DIR, ImageDataset
from metaaug.data.idx import find_idx, read_idx
from metaaug.errors import ConfigError, DataError, ModelError
from metaaug.synth import FDDAConfig, calibration_set, synthesize
from metaaug.synth.bns import BNStats, ClassCentres, bn_layers, class_bns_loss, class_centres, deep_half, global_bns_loss
from metaaug.synth.fdda import FDDALoss
from metaaug.synth.generator import Generator

runner = CliRunner()


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory) -> Path:
    """300 train / 200 test real Fashion-MNIST images as an IDX folder, so CLI runs load and evaluate quickly."""
    folder = tmp_path_factory.mktemp("fmnist")
    for prefix, n in (("train", 300), ("t10k", 200)):
        for kind, ndim in (("images", 3), ("labels", 1)):
            arr = np.ascontiguousarray(read_idx(find_idx(FASHION_MNIST_DIR, f"{prefix}-{kind}-idx{ndim}-ubyte"))[:n])
            header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            (folder / f"{prefix}-{kind}-idx{ndim}-ubyte").write_bytes(header + arr.tobytes())
    return folder


def set_running_stats_to_batch(model: nn.Module, x: torch.Tensor) -> None:
    """Make every BN layer's running statistics equal to the batch statistics of `x` (biased variance)."""
    layers = bn_layers(model)
    for i in range(len(layers)):  # layer by layer: later inputs depend on earlier BN outputs
        with torch.no_grad(), BNStats(model) as rec:
            model(x)
            m = rec.collected()[i]
        mean = m.mean.mean(0)
        layers[i][1].running_mean.copy_(mean)
        layers[i][1].running_var.copy_(m.var.mean(0) + (m.mean - mean).pow(2).mean(0))


def moments_of(model: nn.Module, x: torch.Tensor):
    with torch.no_grad(), BNStats(model) as rec:
        model(x)
        return rec.collected()


def test_global_loss_zero_when_stats_match_positive_otherwise(tiny_net):
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    set_running_stats_to_batch(tiny_net, x)
    assert float(global_bns_loss(moments_of(tiny_net, x), bn_layers(tiny_net))) < 1e-5
    assert float(global_bns_loss(moments_of(tiny_net, 2 * x + 1), bn_layers(tiny_net))) > 0.1


def test_class_losses_zero_at_the_centre_positive_otherwise(tiny_net):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.arange(4).repeat(5)
    ids = deep_half(len(bn_layers(tiny_net)))
    centres = class_centres(tiny_net, x, y, 4, ids)
    moments = moments_of(tiny_net, x)
    assert float(class_bns_loss(moments, y, centres)) < 1e-5  # centralised
    assert float(class_bns_loss(moments_of(tiny_net, x + 1), y, centres)) > 0.1
    shuffled = y[torch.randperm(20, generator=g)]
    assert float(class_bns_loss(moments, shuffled, centres)) > 0.01  # right images, wrong classes
    distorted = class_bns_loss(moments, y, centres, (0.5, 1.0), torch.Generator().manual_seed(0))
    assert float(distorted) > 0.1  # the noise moves the target away from the centre
    zero_noise = ClassCentres(ids, centres.mean, centres.var)
    assert float(class_bns_loss(moments, y, zero_noise, (0.0, 0.0))) < 1e-5


def test_deep_half_takes_the_deeper_layers():
    assert deep_half(5) == [2, 3, 4]
    assert deep_half(1) == [0]
    assert deep_half(21) == list(range(10, 21))


def test_generator_shapes_and_range():
    gen = Generator(10, latent_dim=100, channels=8, value_range=(-0.8, 2.0))
    out = gen(torch.randn(12, 100), torch.arange(12) % 10).detach()
    assert out.shape == (12, 1, 28, 28)
    assert float(out.min()) >= -0.8 and float(out.max()) <= 2.0
    assert Generator(10, channels=8, image_shape=(3, 30, 22))(torch.randn(2, 100), torch.arange(2)).shape == (2, 3, 30, 22)
    with pytest.raises(ConfigError):
        Generator(10, image_shape=(1, 3, 30))


def test_a_few_generator_steps_reduce_the_loss(resnet20, calib256):
    torch.manual_seed(0)
    resnet20 = copy.deepcopy(resnet20).requires_grad_(False)  # the session fixture stays untouched
    cfg = FDDAConfig(batch_size=20, channels=8)
    ids = deep_half(len(bn_layers(resnet20)))
    centres = class_centres(resnet20, calib256.images[:100], calib256.labels[:100], 10, ids)
    gen = Generator(10, cfg.latent_dim, cfg.channels, value_range=cfg.geometry(None)[1]).train()
    loss_fn = FDDALoss(resnet20, cfg, centres, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2, betas=(0.5, 0.999))
    z, y = torch.randn(20, 100, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 10
    cfg_no_noise = FDDAConfig(noise_std_mean=0.0, noise_std_var=0.0)
    eval_fn = FDDALoss(resnet20, cfg_no_noise, centres, torch.Generator())
    first = eval_fn(gen(z, y), y)[1]["total"]
    for _ in range(8):
        total, _ = loss_fn(gen(z, y), y)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert eval_fn(gen(z, y), y)[1]["total"] < first


def test_model_without_bn_gets_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ModelError, match="no BatchNorm"):
        synthesize(model, FDDAConfig(steps=1, per_class=1, real_per_class=0))


def test_synth_then_quantize_on_synthetic_calibration(tmp_path, small_fmnist):
    synth_dir, run_dir = tmp_path / "synth", tmp_path / "run"
    res = runner.invoke(app, ["synth", "--model", "resnet20", "--per-class", "4", "--steps", "3", "--out", str(synth_dir),
                              "--device", "cpu", "--set", "batch_size=20", "--data-dir", str(small_fmnist)])
    assert res.exit_code == 0, res.output
    saved = load_file(str(synth_dir / "images.safetensors"))
    assert saved["images"].shape == (40, 1, 28, 28) and saved["images"].dtype == torch.float32
    assert saved["labels"].dtype == torch.int64 and torch.equal(saved["labels"].bincount(), torch.full((10,), 4))
    assert (synth_dir / "class_0.png").exists() and (synth_dir / "class_9.png").exists()
    report = json.loads((synth_dir / "report.json").read_text())
    assert set(report["fp_accuracy_per_class"]) == {str(i) for i in range(10)}
    assert report["config"]["w_global"] == 0.2 and report["real_per_class"] == 1 and len(report["real_indices"]) == 10
    assert {"before", "after"} <= set(report["bns_distance"])

    res = runner.invoke(app, ["quantize", "--method", "rtn", "--calib-source", "synthetic", "--synth", str(synth_dir),
                              "--calib-size", "32", "--iters", "0", "--device", "cpu", "--out", str(run_dir),
                              "--data-dir", str(small_fmnist)])
    assert res.exit_code == 0, res.output
    run = json.loads((run_dir / "report.json").read_text())
    assert run["calib_source"] == "synthetic" and run["synth"] == str(synth_dir) and run["calib_images"] == 32
    assert json.loads((run_dir / "config.json").read_text())["calib_source"] == "synthetic"

    # without --calib-size the whole synthetic set is used, and the report says how many
    res = runner.invoke(app, ["quantize", "--method", "rtn", "--calib-source", "synthetic", "--synth", str(synth_dir),
                              "--iters", "0", "--device", "cpu", "--out", str(tmp_path / "all"), "--data-dir", str(small_fmnist)])
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "all" / "report.json").read_text())
    assert run["calib_images"] == 40 and run["calib_size"] == 40


@pytest.mark.parametrize("args, message", [
    (["--calib-source", "synthetic"], "needs --synth"),
    (["--calib-source", "mixed", "--synth", "no/such/folder"], "does not exist"),
    (["--calib-source", "fake"], "unknown calibration source"),
    (["--mixed-synth", "8"], "only used with --calib-source mixed"),
])
def test_bad_calib_source_options_are_one_line_errors(tmp_path, small_fmnist, args, message):
    res = runner.invoke(app, ["quantize", "--method", "rtn", "--iters", "0", "--device", "cpu", "--out", str(tmp_path / "r"),
                              "--data-dir", str(small_fmnist), *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_data_free_synth_needs_no_data_and_no_bn_model_errors_in_cli(tmp_path):
    model_file = tmp_path / "nobn.py"
    model_file.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    weights = tmp_path / "w.pt"
    exec(model_file.read_text(), ns := {})
    torch.save(ns["make"]().state_dict(), weights)
    res = runner.invoke(app, ["synth", "--model", f"{model_file}:make", "--weights", str(weights), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "no BatchNorm" in res.output
    res = runner.invoke(app, ["synth", "--real-per-class", "0", "--per-class", "1", "--steps", "1", "--data-dir", "no/such/dir",
                              "--out", str(tmp_path / "df"), "--device", "cpu", "--set", "batch_size=10"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "df" / "report.json").read_text())["data_free"] is True


def test_mixed_set_takes_all_or_a_stratified_share_of_the_synthetic_images(tmp_path):
    train = ImageDataset(torch.randn(200, 1, 8, 8), torch.arange(200) % 10, [str(i) for i in range(10)])
    syn_images = torch.full((100, 1, 8, 8), 7.0)
    save_file({"images": syn_images, "labels": torch.arange(100) % 10}, str(tmp_path / "images.safetensors"))
    every, _ = calibration_set(train, "mixed", tmp_path, 30, seed=0)
    assert len(every) == 130 and int((every.images == 7.0).all(dim=(1, 2, 3)).sum()) == 100
    some, _ = calibration_set(train, "mixed", tmp_path, 30, seed=0, mixed_synth=20)
    synthetic = (some.images == 7.0).all(dim=(1, 2, 3))
    assert len(some) == 50 and int(synthetic.sum()) == 20
    assert torch.equal(some.labels[synthetic].bincount(minlength=10), torch.full((10,), 2))
    real_rows = [{tuple(x.flatten().tolist()) for x in ds.images if not (x == 7.0).all()} for ds in (some, every)]
    assert real_rows[0] == real_rows[1]  # the same real images either way
    with pytest.raises(DataError, match="exceeds the 100 images"):
        calibration_set(train, "mixed", tmp_path, 30, seed=0, mixed_synth=101)
    with pytest.raises(ConfigError, match="only used with --calib-source mixed"):
        calibration_set(train, "synthetic", tmp_path, 30, seed=0, mixed_synth=20)
