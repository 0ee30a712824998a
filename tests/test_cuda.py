"""Device checks: every command runs on a GPU, and what it makes there agrees with the CPU.

Skipped where CUDA is missing (CI has no GPU). `METAAUG_TEST_DEVICE=cpu` runs the same checks on the CPU, which
is how they are kept working between GPU sessions.
"""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from metaaug import quantize
from metaaug.cli.app import app
from metaaug.data import load_dataset
from metaaug.evaluate import top1
from metaaug.pipeline import load_run
from metaaug.quant import QuantSpec
from metaaug.quant.quantizers import ActQuantizer, lsq_fake_quant

DEVICE = os.environ.get("METAAUG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
runner = CliRunner()


def invoke(args: list[str]) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output


def test_fused_quantizer_gradients_match_the_cpu():
    torch.manual_seed(0)
    x, s, g = torch.randn(4096) * 2, torch.tensor([0.3]), torch.randn(4096)
    grads = []
    for dev in ("cpu", DEVICE):
        xd, sd = x.clone().to(dev).requires_grad_(True), s.clone().to(dev).requires_grad_(True)
        (lsq_fake_quant(xd, sd, -2, 1) * g.to(dev)).sum().backward()
        grads.append((xd.grad.cpu(), sd.grad.cpu()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs exist on CUDA only")
def test_an_activation_quantizer_step_makes_no_host_sync():
    aq = ActQuantizer(4).to(DEVICE)
    aq.init_from(torch.randn(4096, device=DEVICE))
    aq.enabled, aq.quant_prob = True, 0.5
    x = torch.randn(4096, device=DEVICE, requires_grad=True)
    aq.scale.requires_grad_(True)
    aq(x)  # the first call reads the signed flag once
    torch.cuda.set_sync_debug_mode("error")
    try:
        aq(x).square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None and aq.scale.grad is not None


def test_round_to_nearest_on_the_device_predicts_like_the_cpu(resnet20, calib256, fmnist_test_small):
    test = fmnist_test_small.subset(torch.arange(512))
    spec = QuantSpec(4, 4)
    cpu = quantize(resnet20, calib256.images, "rtn", spec, device="cpu")
    dev = quantize(resnet20, calib256.images, "rtn", spec, device=DEVICE)
    assert next(dev.parameters()).device.type == DEVICE
    if DEVICE == "cuda":  # TF32 convolutions flipped 2% of the predictions: resolve_device turns them off
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    with torch.no_grad():
        a, b = cpu(test.images).argmax(1), dev(test.images.to(DEVICE)).argmax(1).cpu()
    assert (a == b).float().mean() >= 0.995


METHODS = [("rtn", []), ("adaround", []), ("brecq", []), ("qdrop", []), ("metaaug", ["--meta-iters", "2"]),
           ("metaaug", ["--meta-iters", "2", "--set", "meta_schedule=spread", "--set", "aug_views=1"])]


@pytest.mark.parametrize("method,extra", METHODS, ids=["rtn", "adaround", "brecq", "qdrop", "metaaug", "metaaug-spread"])
def test_every_method_quantizes_on_the_device_and_the_cpu_reproduces_it(method, extra, tmp_path, small_data):
    run = tmp_path / "run"
    invoke(["quantize", "--method", method, "--wbits", "4", "--abits", "4", "--calib-size", "32", "--iters", "4",
            "--device", DEVICE, "--data-dir", str(small_data), "--out", str(run), *extra])
    report = json.loads((run / "report.json").read_text())
    assert report["device"].startswith(DEVICE)
    assert report.get("gpu") == (torch.cuda.get_device_name() if DEVICE == "cuda" else None)  # which card made it
    assert report["quant_top1"] >= report["fp_top1"] - 5  # W4A4 of ResNet-20 stays within a few points of FP
    invoke(["eval", "--run", str(run), "--device", DEVICE])  # exits 1 unless it reproduces the report exactly
    qmodel, _, _ = load_run(run, "cpu")
    cpu_top1 = top1(qmodel, load_dataset(str(small_data), "test"), device=torch.device("cpu"))
    assert abs(cpu_top1 - report["quant_top1"]) <= 0.2, (cpu_top1, report["quant_top1"])
    invoke(["export", "--run", str(run), "--format", "packed"])


def test_search_then_policy_quantize_on_the_device(tmp_path, small_data):
    out, run = tmp_path / "search", tmp_path / "run"
    invoke(["search", "--model", "resnet20", "--avg-wbits", "2.5", "--wbits-choices", "2,3,4", "--abits", "4",
            "--generations", "2", "--population", "4", "--meta-steps", "3", "--calib-size", "64", "--meta-images", "16",
            "--seed", "0", "--data-dir", str(small_data), "--device", DEVICE, "--out", str(out)])
    summary = json.loads((out / "search.json").read_text())
    assert summary["device"].startswith(DEVICE) and summary["best"]["cost"]["avg_wbits"] <= 2.5
    invoke(["quantize", "--policy", str(out / "policy.json"), "--method", "qdrop", "--iters", "3", "--calib-size", "32",
            "--device", DEVICE, "--data-dir", str(small_data), "--out", str(run)])
    report = json.loads((run / "report.json").read_text())
    assert report["cost"]["avg_wbits"] == summary["best"]["cost"]["avg_wbits"]


def test_qat_and_synth_on_the_device(tmp_path, small_data):
    qat, synth, run = tmp_path / "qat", tmp_path / "synth", tmp_path / "run"
    invoke(["qat", "--bits", "2,8", "--steps", "2", "--batch", "16", "--data-dir", str(small_data), "--device", DEVICE,
            "--out", str(qat)])
    assert set(json.loads((qat / "report.json").read_text())["top1"]) == {"fp", "w2a2", "w8a8"}
    invoke(["eval", "--run", str(qat), "--bits", "8", "--device", DEVICE])
    invoke(["synth", "--model", "resnet20", "--per-class", "2", "--steps", "3", "--out", str(synth), "--device", DEVICE,
            "--set", "batch_size=20", "--data-dir", str(small_data)])
    invoke(["quantize", "--method", "qdrop", "--iters", "2", "--calib-source", "synthetic", "--synth", str(synth),
            "--device", DEVICE, "--data-dir", str(small_data), "--out", str(run)])
    assert json.loads((run / "report.json").read_text())["calib_images"] == 20
