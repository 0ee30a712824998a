"""Bitwidth-adaptive QAT (MEBQAT): training improves every width, a width evaluates exactly as its export, an
interrupted run resumes bit-exactly, episodes never leak seen classes, and bad input gets one line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import TinyNet
from metaaug.cli.app import app
from metaaug.data import load_dataset, stratified_indices
from metaaug.errors import ConfigError
from metaaug.evaluate import logits_of
from metaaug.export.jobs import export_packed_run
from metaaug.qat import QATConfig, QATModel
from metaaug.qat.fewshot import EpisodeConfig, run_fewshot, sample_episode
from metaaug.qat.job import QATJob, eval_width, load_qat_run, run_qat
from metaaug.qat.trainer import evaluate_widths, train_qat

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_data(small_data):
    train, test = load_dataset(small_data, "train"), load_dataset(small_data, "test")
    return train.subset(stratified_indices(train.labels, 4096, 0)), train.images[:256], test.subset(torch.arange(400))


def tiny_qat(calib: torch.Tensor, shared: bool = False) -> QATModel:
    torch.manual_seed(0)
    return QATModel(TinyNet(c=8), (2, 4, 8), (2, 4, 8), calib, shared=shared)


@pytest.mark.parametrize("method", ["mebqat", "mebqat-maml"])
def test_training_improves_every_width(tiny_data, tmp_path, method):
    train, calib, test = tiny_data
    model = tiny_qat(calib)
    cfg = QATConfig(method=method, bits=(2, 4, 8), tasks=2, steps=80, batch=64, lr=1e-2, save_every=1000)
    widths = [None, *cfg.widths()]
    before = evaluate_widths(model, widths, calib, test, torch.device("cpu"))
    state = train_qat(model, cfg, train, calib, test, tmp_path, torch.device("cpu"))
    after = state.history[-1]["top1"]
    assert after.keys() == before.keys() == {"fp", "w2a2", "w4a4", "w8a8"}
    for name in before:  # an untrained net is near chance (10%): every width must learn
        assert after[name] > before[name] + 10, (before, after)


def test_shared_quantizers_train_one_range_for_all_widths(tiny_data):
    _, calib, _ = tiny_data
    model = tiny_qat(calib, shared=True)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".wq." in n or ".aq." in n}
    assert names == {"log_range"}
    per_width = tiny_qat(calib)
    assert {n.rsplit(".", 1)[-1] for n, _ in per_width.named_parameters() if ".wq." in n} >= {"2", "4"}


def test_interrupted_training_resumes_bit_exactly(tiny_data, tmp_path):
    train, calib, test = tiny_data
    cfg = QATConfig(bits=(2, 4, 8), tasks=2, steps=7, batch=32, lr=5e-3, save_every=2)
    full = tiny_qat(calib)
    train_qat(full, cfg, train, calib, test, tmp_path / "full", torch.device("cpu"))

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train_qat(tiny_qat(calib), cfg, train, calib, test, tmp_path / "cut", torch.device("cpu"), on_step=stop)
    resumed = tiny_qat(calib)
    state = train_qat(resumed, cfg, train, calib, test, tmp_path / "cut", torch.device("cpu"))
    assert state.step == 7
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


@pytest.fixture(scope="module")
def qat_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "run"
    job = QATJob(model="resnet20", data_dir=str(small_data), seed=0,
                 qat=QATConfig(bits=(2, 4, 8), steps=4, batch=32, calib_size=128, eval_size=100, classes=(0, 1, 2, 3, 4, 5)))
    report = run_qat(job, out, "cpu")
    return out, report


def test_qat_run_reports_every_width_and_an_unseen_one(qat_run, small_data):
    out, report = qat_run
    assert set(report["top1"]) == {"fp", "w2a2", "w4a4", "w8a8"}
    assert set(report["unseen_top1"]) == {"w5a5", "w6a6"}
    assert report["test_images"] == int((load_dataset(small_data, "test").labels < 6).sum())  # seen classes only
    assert (out / "accuracy.png").stat().st_size > 0
    # an unseen width lands between its trained neighbours (interpolated quantizers): at least above W2A2
    assert report["unseen_top1"]["w5a5"] > report["top1"]["w2a2"]


def test_eval_at_a_width_equals_its_packed_export(qat_run, tmp_path):
    out, report = qat_run
    assert eval_width(out, (2, 2), "cpu")["quant_top1"] == report["top1"]["w2a2"]
    model, job, _ = load_qat_run(out, "cpu")
    model.use_width((2, 2))
    x = load_dataset(job.data_dir, "test").images[:64]
    assert torch.equal(logits_of(model.eval(), x), logits_of(model.materialize((2, 2)), x))
    r = export_packed_run(out, tmp_path / "w2.mq.safetensors", limit=200, bits="2")
    assert r["packed_max_abs_logit_diff"] == 0.0
    assert r["packed_weight_bytes"] < r["fp32_weight_bytes"] / 10


def test_cli_eval_prints_the_width_top1(qat_run):
    out, report = qat_run
    res = runner.invoke(app, ["eval", "--run", str(out), "--bits", "4"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    assert got["quant_top1"] == report["top1"]["w4a4"] and got["width"] == "w4a4"


def test_episodes_never_leak_seen_classes(small_data):
    test = load_dataset(small_data, "test")
    unseen = [6, 7, 8, 9]
    by_class = {c: torch.nonzero(test.labels == c).flatten() for c in unseen}
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        classes, support, query = sample_episode(by_class, 4, 5, 15, gen)
        assert set(classes) <= set(unseen)
        assert set(test.labels[support].tolist()) <= set(unseen) and set(test.labels[query].tolist()) <= set(unseen)
        assert not set(support.tolist()) & set(query.tolist())
        assert test.labels[support].view(4, 5).unique(dim=1).shape[1] == 1  # class-major: one class per row


def test_fewshot_on_unseen_classes_beats_chance(qat_run):
    out, _ = qat_run
    res = run_fewshot(out, [None, 2], EpisodeConfig(ways=4, shots=(5,), episodes=30))
    assert res["unseen_classes"] == [6, 7, 8, 9]
    assert len(res["results"]) == 4
    for r in res["results"]:
        assert r["mean"] > 40, r  # chance is 25%


@pytest.mark.parametrize(("args", "message"), [
    (["qat", "--bits", "2,9", "--steps", "1"], "candidate bit-width must be an integer in 2..8, got 9"),
    (["qat", "--bits", "", "--steps", "1"], "--bits is empty"),
    (["qat", "--method", "magic", "--steps", "1"], "unknown QAT method 'magic'"),
    (["qat", "--method", "dedicated", "--bits", "2,4", "--steps", "1"], "dedicated QAT trains one width"),
])
def test_qat_cli_rejects_bad_input_with_one_line(tmp_path, args, message):
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_a_quantize_run_is_not_a_qat_run(tmp_path):
    run = tmp_path / "ptq"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "resnet20", "method": "qdrop"}))
    res = runner.invoke(app, ["eval", "--run", str(run), "--bits", "4"])
    assert res.exit_code == 2
    assert "is not a QAT run" in res.output
    with pytest.raises(ConfigError, match="empty"):
        QATConfig(bits=())


def test_qat_cli_trains_and_prints_the_widths(small_data, tmp_path):
    out = tmp_path / "q"
    res = runner.invoke(app, ["qat", "--bits", "2,8", "--steps", "2", "--batch", "16", "--data-dir", str(small_data),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["top1"]) == {"fp", "w2a2", "w8a8"} and report["steps"] == 2
    assert report["command"].startswith("metaaug ")
    assert "w2a2" in res.output and "unseen" in res.output
