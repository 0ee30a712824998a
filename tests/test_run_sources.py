"""A run names its model, weights and data by absolute paths, so later commands work from any folder; RTN, which
has no iterations, reports none."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from metaaug.cli.app import app
from metaaug.pipeline import RunConfig

runner = CliRunner()

MODEL = """
from torch import nn
def small():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
"""


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's folder holding models.py and its weights, as the working directory."""
    import torch

    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "models.py").write_text(MODEL)
    torch.manual_seed(0)
    ns: dict = {}
    exec(MODEL, ns)
    save_file(ns["small"]().state_dict(), str(folder / "w.safetensors"))
    monkeypatch.chdir(folder)
    return folder


def test_relative_paths_are_stored_absolute(user_folder):
    cfg = RunConfig(model="models.py:small", weights="w.safetensors", data_dir="data")
    assert cfg.model == f"{user_folder / 'models.py'}:small"
    assert cfg.weights == str(user_folder / "w.safetensors") and cfg.data_dir == str(user_folder / "data")
    assert RunConfig(model="resnet20").model == "resnet20"  # a bundled name is not a path


def test_a_run_from_relative_paths_is_evaluated_from_another_folder(user_folder, tiny_data_dir, tmp_path, monkeypatch):
    res = runner.invoke(app, ["quantize", "--model", "models.py:small", "--weights", "w.safetensors", "--method", "rtn",
                              "--calib-size", "32", "--data-dir", os.path.relpath(tiny_data_dir), "--out", "run"])
    assert res.exit_code == 0, res.output
    config = json.loads((user_folder / "run" / "config.json").read_text())
    assert config["model"] == f"{user_folder / 'models.py'}:small"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = runner.invoke(app, ["eval", "--run", str(user_folder / "run")])
    assert res.exit_code == 0, res.output
    assert '"reproduced": true' in res.output


def test_rtn_reports_no_iterations(user_folder, tiny_data_dir):
    res = runner.invoke(app, ["quantize", "--model", "models.py:small", "--weights", "w.safetensors", "--method", "rtn",
                              "--calib-size", "32", "--iters", "7", "--data-dir", str(tiny_data_dir), "--out", "run"])
    assert res.exit_code == 0, res.output
    assert "--iters 7: method rtn runs no iterations; ignored" in " ".join(res.output.split())
    report = json.loads((user_folder / "run" / "report.json").read_text())
    assert report["iters"] == 0 and report["method_config"]["iters"] == 0
    assert all(u["iters"] == 0 for u in report["units"])
