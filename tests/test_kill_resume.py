"""kill -9 at the write points of every job kind: the rerun resumes to the uninterrupted result, bit for bit.

`METAAUG_KILL_AT=N` makes the job SIGKILL itself right after its N-th atomic write (`N.tmp`: after the temp file,
before the rename). The points below sit inside a checkpoint (a part written, its manifest not yet), right after a
checkpoint, and between the final files, where a torn save would have paired new tensors with an old index.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import TinyNet, randomize_bn
from metaaug.cli.app import app
from metaaug.runs import files as run_files

runner = CliRunner()

MODEL = """
import sys
sys.path.insert(0, {tests!r})
from conftest import TinyNet


def build():
    return TinyNet()
"""


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("killmodel")
    (folder / "net.py").write_text(MODEL.format(tests=os.path.dirname(__file__)))
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in randomize_bn(TinyNet()).state_dict().items()}, str(folder / "net.safetensors"))
    return f"{folder / 'net.py'}:build", str(folder / "net.safetensors")


def job_args(kind: str, user_model, data, out) -> list[str]:
    model, weights = user_model
    common = ["--model", model, "--weights", weights, "--data-dir", str(data), "--out", str(out)]
    return {
        "quantize": ["quantize", "--method", "qdrop", "--calib-size", "16", "--iters", "2", *common],
        "metaaug": ["quantize", "--method", "metaaug", "--meta-iters", "2", "--calib-size", "16", "--iters", "2", *common],
        "search": ["search", "--wbits-choices", "2,4", "--avg-wbits", "3", "--meta-steps", "120", "--generations", "2",
                   "--population", "4", "--calib-size", "64", *common],
        "qat": ["qat", "--bits", "2,4", "--steps", "3", "--batch", "32", *common],
    }[kind]


def result_of(kind: str, out) -> dict:
    """What must not differ between an uninterrupted run and a killed-then-resumed one."""
    if kind in ("quantize", "metaaug"):
        report = json.loads((out / "report.json").read_text())
        return {"weights": load_file(str(out / "quantized.safetensors")), "top1": report["quant_top1"]}
    if kind == "qat":
        report = json.loads((out / "report.json").read_text())
        return {"weights": load_file(str(out / "qat.safetensors")), "top1": report["top1"]}
    summary = json.loads((out / "search.json").read_text())
    return {"policy": json.loads((out / "policy.json").read_text()), "best": summary["best"], "curve": summary["meta_curve"],
            "candidates": summary["candidates"]}


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], dict) and a[k] and isinstance(next(iter(a[k].values())), torch.Tensor):
            if a[k].keys() != b[k].keys() or not all(torch.equal(a[k][n], b[k][n]) for n in a[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


_reference: dict[str, tuple[dict, int]] = {}


def reference(kind, user_model, data, tmp_path_factory) -> tuple[dict, int]:
    """The uninterrupted result and the number of atomic writes the job makes."""
    if kind not in _reference:
        out = tmp_path_factory.mktemp(f"ref-{kind}") / "run"
        before = run_files._writes
        res = runner.invoke(app, job_args(kind, user_model, data, out))
        assert res.exit_code == 0, res.output
        _reference[kind] = (result_of(kind, out), run_files._writes - before)
    return _reference[kind]


def killed_at(point: str, args: list[str]) -> None:
    env = {**os.environ, "METAAUG_KILL_AT": point}
    proc = subprocess.run([sys.executable, "-m", "metaaug", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at write {point} (rc {proc.returncode}): {proc.stderr[-800:]}"


# (kind, write point): negative points count back from the job's last write
POINTS = [
    ("quantize", "4.tmp"),  # unit 2's tensor part half-written
    ("quantize", "4"),  # unit 2's tensor part written, its manifest not: the manifest still names unit 1
    ("quantize", "-1"),  # quantized.safetensors written, report.json not
    ("metaaug", "6"),  # unit 2's state and T written, its manifest not
    ("metaaug", "7"),  # right after unit 2's manifest
    ("search", "3"),  # MetaQuantNet's checkpoint at step 100 written (net, optimiser state, manifest)
    ("search", "-3"),  # the GA finished and saved its state and policy.json, the plots and search.json not yet
    ("qat", "3"),  # the checkpoint's weights and optimiser state written, its manifest not
    ("qat", "5"),  # the final weights written, BatchNorm statistics, plot and report not
]


@pytest.mark.parametrize(("kind", "point"), POINTS)
def test_a_job_killed_at_a_write_resumes_to_the_uninterrupted_result(kind, point, user_model, tiny_data_dir, tmp_path,
                                                                       tmp_path_factory):
    expected, writes = reference(kind, user_model, tiny_data_dir, tmp_path_factory)
    at = str(writes + int(point)) if point.startswith("-") else point
    out = tmp_path / "run"
    args = job_args(kind, user_model, tiny_data_dir, out)
    killed_at(at, args)
    assert not list(out.glob(".*.tmp-*")) or at.endswith(".tmp")  # only a kill mid-write leaves a temp file
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert same(result_of(kind, out), expected), f"{kind} killed at write {at} resumed to a different result"
    assert not list(out.glob(".*.tmp-*")) or at.endswith(".tmp")


TRAIN = """
import sys
import torch
sys.path.insert(0, {tests!r})
from pathlib import Path

import metaaug.train as train_mod
from metaaug.data.datasets import ImageDataset
from test_train import tiny_model

g = torch.Generator().manual_seed(0)
data = ImageDataset(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g), [str(i) for i in range(10)])
train_mod.load_dataset = lambda *_: data
train_mod.BUNDLED["tiny"] = tiny_model
train_mod.train("tiny", 3, 16, 0.1, 5e-4, 0, Path({out!r}))
"""


@pytest.mark.parametrize("point", ["2", "3.tmp", "5"])  # epoch 1: parts written, manifest half-written; epoch 2: parts written
def test_training_killed_at_a_write_resumes_bit_exactly(tmp_path, point):
    def run(out, kill: str | None) -> int:
        env = {**os.environ, **({"METAAUG_KILL_AT": kill} if kill else {})}
        return subprocess.run([sys.executable, "-c", TRAIN.format(tests=os.path.dirname(__file__), out=str(out))], env=env,
                              capture_output=True, timeout=300).returncode
    assert run(tmp_path / "full", None) == 0
    assert run(tmp_path / "killed", point) == -signal.SIGKILL
    assert run(tmp_path / "killed", None) == 0
    a, b = load_file(str(tmp_path / "full" / "tiny_fmnist.safetensors")), load_file(str(tmp_path / "killed" / "tiny_fmnist.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "full" / "tiny_fmnist.json").read_text())["test_top1"] == \
        json.loads((tmp_path / "killed" / "tiny_fmnist.json").read_text())["test_top1"]
