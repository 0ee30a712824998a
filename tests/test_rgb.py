"""Images that are not 28x28 grey: an RGB image folder of another size loads, normalises and runs end to end
(quantize, synth, quantize on synthetic images, packed and ONNX export) with a user's model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from metaaug.cli.app import app

runner = CliRunner()

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make():
    torch.manual_seed(0)
    return Net()
'''


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for k, cls in enumerate(("red", "green", "blue")):
            (root / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 120, (30, 26, 3), dtype=np.uint8)
                arr[..., k] += 120  # each class brighter in its own channel
                Image.fromarray(arr).save(root / "data" / split / cls / f"{i}.png")
    (root / "net.py").write_text(MODEL)
    ns: dict = {}
    exec(MODEL, ns)
    torch.save(ns["make"]().state_dict(), root / "net.pt")
    return root


def test_rgb_folder_end_to_end(rgb, tmp_path):
    common = ["--model", f"{rgb / 'net.py'}:make", "--weights", str(rgb / "net.pt"), "--data-dir", str(rgb / "data"),
              "--device", "cpu"]
    run = tmp_path / "run"
    res = runner.invoke(app, ["quantize", *common, "--method", "qdrop", "--iters", "2", "--calib-size", "12", "--out", str(run)])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "report.json").read_text())
    assert report["calib_images"] == 12 and [u["found"] for u in report["unit_plan"]] == ["layer", "residual", "layer"]

    synth = tmp_path / "synth"
    res = runner.invoke(app, ["synth", *common, "--per-class", "2", "--steps", "2", "--set", "batch_size=6", "--out", str(synth)])
    assert res.exit_code == 0, res.output
    assert load_file(str(synth / "images.safetensors"))["images"].shape == (6, 3, 30, 26)
    res = runner.invoke(app, ["quantize", *common, "--method", "rtn", "--calib-source", "synthetic", "--synth", str(synth),
                              "--out", str(tmp_path / "on_synth")])
    assert res.exit_code == 0, res.output

    for fmt in ("packed", "onnx"):
        res = runner.invoke(app, ["export", "--run", str(run), "--format", fmt, "--data-dir", str(rgb / "data")])
        assert res.exit_code == 0, (fmt, res.output)
