"""Every bad input gets one clear line and a non-zero exit, and nothing half-written is left as a result."""

import math

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from metaaug import quantize
from metaaug.cli.app import app
from metaaug.errors import DataError, ModelError
from metaaug.models.resnet import resnet20

runner = CliRunner()
BASE = ["quantize", "--calib-size", "32", "--iters", "1"]


def run_cli(tmp_path, *extra):
    out = tmp_path / "out"
    res = runner.invoke(app, [*BASE, "--out", str(out), *extra])
    return res, out


@pytest.mark.parametrize(("extra", "message"), [
    (["--wbits", "1"], "weight bit-width (wbits) must be an integer in 2..8"),
    (["--abits", "9"], "activation bit-width (abits) must be an integer in 2..8"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--calib-size", "-3"], "calibration size must be positive"),
    (["--calib-size", "0"], "calibration size must be positive"),
    (["--data-dir", "/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
    (["--model", "/nonexistent/m.py:build", "--weights", "w.safetensors"], "model file /nonexistent/m.py does not exist"),
])
def test_cli_rejects_bad_input_with_one_line(tmp_path, extra, message):
    res, out = run_cli(tmp_path, *extra)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not (out / "report.json").exists()
    assert not (out / "config.json").exists(), "a refused run must not claim the run folder"


def test_mismatched_weights_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    state = resnet20().state_dict()
    state["fc.weight"] = torch.zeros(5, 64)
    save_file(state, str(bad))
    res, _ = run_cli(tmp_path, "--weights", str(bad))
    assert res.exit_code == 2
    assert "does not match the model" in res.output and "fc.weight" in " ".join(res.output.split())


def test_pickled_checkpoint_is_not_unpickled(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "obj": math.gcd}, evil)  # a non-tensor object: refused by weights_only
    res, _ = run_cli(tmp_path, "--weights", str(evil))
    assert res.exit_code == 2 and "cannot read weights file" in res.output


def test_user_model_via_file_and_factory(tmp_path):
    src = tmp_path / "mymodel.py"
    src.write_text("from metaaug.models.resnet import resnet20\n\ndef build():\n    return resnet20()\n")
    from metaaug.models.registry import bundled_weights

    res, out = run_cli(tmp_path, "--model", f"{src}:build", "--weights", str(bundled_weights("resnet20")), "--method", "rtn")
    assert res.exit_code == 0, res.output
    assert (out / "report.json").exists()


def test_out_folder_with_different_config_is_refused(tmp_path):
    res, _ = run_cli(tmp_path, "--method", "rtn")
    assert res.exit_code == 0, res.output
    res, _ = run_cli(tmp_path, "--method", "rtn", "--wbits", "3")
    assert res.exit_code == 2 and "holds a run with a different config" in res.output and "wbits" in res.output


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data(bad):
    x = torch.randn(32, 1, 28, 28)
    x[3, 0, 1, 1] = bad
    with pytest.raises(DataError, match=r"1 image\(s\) contain NaN or Inf"):
        quantize(resnet20(), x, "rtn")


def test_empty_calibration_data():
    with pytest.raises(DataError, match="no images"):
        quantize(resnet20(), torch.empty(0, 1, 28, 28), "rtn")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(tmp_path, bad):
    path = tmp_path / "nan.safetensors"
    state = resnet20().state_dict()
    state["layer2.1.conv1.weight"][0, 0, 0, 0] = bad
    save_file(state, str(path))
    res, out = run_cli(tmp_path, "--weights", str(path), "--method", "rtn")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "tensor 'layer2.1.conv1.weight' holds 1 NaN/Inf value(s)" in " ".join(res.output.split())
    assert not (out / "config.json").exists()


def test_api_refuses_a_model_with_non_finite_weights():
    model = resnet20()
    with torch.no_grad():
        model.fc.bias[3] = float("nan")
    with pytest.raises(ModelError, match=r"'fc\.bias' holds 1 NaN/Inf"):
        quantize(model, torch.randn(32, 1, 28, 28), "rtn")


@pytest.mark.parametrize(("source", "message"), [
    ("def build(:\n    pass\n", "failed to import: SyntaxError"),
    ("import no_such_package_xyz\n\ndef build():\n    pass\n", "failed to import: ModuleNotFoundError: No module named 'no_such_package_xyz'"),
    ("def build():\n    raise RuntimeError('bad width')\n", "build() raised RuntimeError: bad width"),
])
def test_broken_model_file_is_one_line(tmp_path, source, message):
    src = tmp_path / "broken.py"
    src.write_text(source)
    res, _ = run_cli(tmp_path, "--model", f"{src}:build", "--weights", "w.safetensors")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert message in text and str(src.name) in text and "Traceback" not in res.output
