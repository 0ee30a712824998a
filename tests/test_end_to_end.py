"""End-to-end behaviour on the bundled ResNet-20 at tiny iteration counts (accuracy claims live in bench/)."""

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from metaaug import quantize
from metaaug.cli.app import app
from metaaug.evaluate import top1
from metaaug.progress import NullProgress
from metaaug.quant import QuantSpec
from metaaug.runs.store import RunStore

runner = CliRunner()


def state_of(qmodel):
    return {k: v.clone() for k, v in qmodel.state_dict().items()}


def test_qdrop_beats_rtn_at_w2a4(resnet20, calib256, fmnist_test_small):
    spec = QuantSpec(2, 4)
    rtn = quantize(resnet20, calib256.images, "rtn", spec, device="cpu")
    qdrop = quantize(resnet20, calib256.images, method_cfg("qdrop", 150), spec, device="cpu")
    acc_rtn, acc_qdrop = top1(rtn, fmnist_test_small), top1(qdrop, fmnist_test_small)
    assert acc_qdrop > acc_rtn + 10, (acc_rtn, acc_qdrop)


def method_cfg(name, iters):
    from metaaug.methods import method_config

    return method_config(name, iters=iters)


class Interrupt(Exception):
    pass


class StopAfter(NullProgress):
    """Progress callback that kills the run after `n` finished units, like Ctrl-C would."""

    def __init__(self, n):
        self.n = n

    def unit_end(self, index, stats):
        if index + 1 == self.n:
            raise Interrupt


def test_resume_after_interrupt_equals_uninterrupted_run(resnet20, calib256, tmp_path):
    cfg = method_cfg("qdrop", 20)
    imgs = calib256.images[:64]
    full = quantize(resnet20, imgs, cfg, QuantSpec(2, 4), seed=1, device="cpu")
    store = RunStore(tmp_path, {"x": 1})
    with pytest.raises(Interrupt):
        quantize(resnet20, imgs, cfg, QuantSpec(2, 4), seed=1, device="cpu", store=store, progress=StopAfter(4))
    assert json.loads((tmp_path / "progress.json").read_text())["units_done"] == 4
    resumed = quantize(resnet20, imgs, cfg, QuantSpec(2, 4), seed=1, device="cpu", store=RunStore(tmp_path, {"x": 1}))
    a, b = state_of(full), state_of(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    x = imgs[:16]
    assert torch.equal(full(x), resumed(x))


class SlowThenStop(NullProgress):
    """Each unit starts 0.5 s late (time a run really spends), and the run is killed after `n` units."""

    def __init__(self, n):
        self.n = n

    def unit_start(self, index, name, iters):
        time.sleep(0.5)

    def unit_end(self, index, stats):
        if index + 1 == self.n:
            raise Interrupt


def test_a_resumed_runs_report_counts_the_time_spent_before_the_interrupt(small_data, tmp_path):
    from metaaug.pipeline import RunConfig, run_job

    cfg = RunConfig(method="qdrop", wbits=2, abits=4, calib_size=32, iters=2, data_dir=str(small_data))
    with pytest.raises(Interrupt):
        run_job(cfg, tmp_path, device="cpu", progress=SlowThenStop(6))
    saved = json.loads((tmp_path / "progress.json").read_text())
    assert saved["units_done"] == 6 and saved["elapsed"] >= 3.0
    start = time.perf_counter()
    report = run_job(cfg, tmp_path, device="cpu")
    wall = time.perf_counter() - start
    assert report["resumed_units"] == 6
    assert saved["elapsed"] + wall - 1.0 <= report["seconds"] <= saved["elapsed"] + wall + 0.1


@pytest.mark.parametrize("schedule", ["before", "spread"])
def test_metaaug_resumes_with_its_transformation_network_and_matches_the_uninterrupted_run(tmp_path, schedule):
    from conftest import TinyNet, randomize_bn
    from metaaug.methods.metaaug import MetaAugConfig

    torch.manual_seed(0)
    model, imgs = randomize_bn(TinyNet()), torch.randn(12, 1, 28, 28)
    cfg = MetaAugConfig(iters=6, meta_iters=3, meta_batch=4, lr_t=1e-2, meta_schedule=schedule)
    full = quantize(model, imgs, cfg, QuantSpec(2, 2), seed=3, device="cpu")
    with pytest.raises(Interrupt):  # stop after the stem and the first block: T has taken its first block's steps
        quantize(model, imgs, cfg, QuantSpec(2, 2), seed=3, device="cpu", store=RunStore(tmp_path, {"x": 1}),
                 progress=StopAfter(2))
    method_part = tmp_path / json.loads((tmp_path / "progress.json").read_text())["checkpoint"]["parts"]["method"]
    assert method_part.exists()
    resumed = quantize(model, imgs, cfg, QuantSpec(2, 2), seed=3, device="cpu", store=RunStore(tmp_path, {"x": 1}))
    a, b = state_of(full), state_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    last = json.loads((tmp_path / "progress.json").read_text())["checkpoint"]["parts"]["method"]
    (tmp_path / last).write_bytes(b"not a checkpoint")  # a part edited or truncated after its manifest was written
    with pytest.raises(Exception, match=r"does not match progress\.json"):
        quantize(model, imgs, cfg, QuantSpec(2, 2), seed=3, device="cpu", store=RunStore(tmp_path, {"x": 1}))


def test_same_seed_same_result_different_seed_differs(resnet20, calib256):
    cfg, imgs = method_cfg("qdrop", 10), calib256.images[:48]
    a = quantize(resnet20, imgs, cfg, QuantSpec(2, 4), seed=0, device="cpu")
    b = quantize(resnet20, imgs, cfg, QuantSpec(2, 4), seed=0, device="cpu")
    c = quantize(resnet20, imgs, cfg, QuantSpec(2, 4), seed=5, device="cpu")
    x = imgs[:8]
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))


def test_cli_quantize_writes_report_and_eval_reproduces(tmp_path):
    out = tmp_path / "run"
    args = ["quantize", "--model", "resnet20", "--method", "qdrop", "--wbits", "2", "--abits", "4",
            "--calib-size", "64", "--iters", "5", "--seed", "0", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "method", "wbits", "abits", "calib_size", "iters", "seed", "fp_top1", "quant_top1",
                "calib_top1", "seconds"):
        assert key in report
    assert report["fp_top1"] >= 93.0 and 0 <= report["quant_top1"] <= 100
    assert (out / "quantized.safetensors").exists()
    assert all("ms_per_iter" in u for u in report["units"])
    assert report["cpu"] == torch.backends.cpu.get_cpu_capability()  # the host's kernel level: results differ across it
    res = runner.invoke(app, ["eval", "--run", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["quant_top1"] == report["quant_top1"]


def test_run_store_accepts_its_own_config_with_tuples(tmp_path):
    """A config holding tuples (MetaAug's loss terms) is stored as JSON lists; re-opening must not see a change."""
    RunStore(tmp_path, {"terms": ("kl", "pkt"), "x": 1})
    RunStore(tmp_path, {"terms": ("kl", "pkt"), "x": 1})
    RunStore(tmp_path, {"terms": ("kl", "pkt"), "x": 1, "policy": None})  # a field added later, at its None default
    with pytest.raises(Exception, match="different config"):
        RunStore(tmp_path, {"terms": ("kl",), "x": 1})


def test_a_run_stored_before_a_method_field_existed_resumes_while_that_field_stays_at_its_default(tmp_path):
    from metaaug.pipeline import RunConfig

    cfg = RunConfig(method="metaaug", options={"meta_iters": 5})
    stored = cfg.identity()
    del stored["method_config"]["inner_steps"], stored["method_config"]["meta_schedule"]  # as an older version wrote it
    (tmp_path / "config.json").write_text(json.dumps(stored))
    cfg.store(tmp_path)
    with pytest.raises(Exception, match=r"differs in: method_config\.inner_steps"):
        RunConfig(method="metaaug", options={"meta_iters": 5, "inner_steps": 3}).store(tmp_path)
    with pytest.raises(Exception, match=r"differs in: method_config\.meta_iters"):
        RunConfig(method="metaaug", options={"meta_iters": 6}).store(tmp_path)


def test_ten_image_calibration_set_one_per_class(tmp_path, small_data):
    """Scarce calibration: 10 images (one per class) is smaller than a batch; batches are drawn with replacement."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "--calib-size", "10", "--method", "qdrop", "--iters", "3", "--data-dir", str(small_data),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["calib_images"] == 10 and report["calib_size"] == 10
    from metaaug.data import calibration_split, load_dataset

    calib, _ = calibration_split(load_dataset(str(small_data), "train"), 10, seed=0)
    assert sorted(calib.labels.tolist()) == list(range(10))


def test_models_command_lists_bundled_models_with_their_card():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    assert "resnet20" in res.output and "94.03" in res.output and "272,186" in res.output
    assert "mobilenetv2" in res.output and "93.29" in res.output
    assert "resnet56" in res.output and "94.06" in res.output and "855,482" in res.output
    assert "vit" in res.output and "87.03" in res.output and "805,130" in res.output
