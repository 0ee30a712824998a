"""One registry maps a config type to its handler: a new method is its config and a handler, nothing else."""

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

import metaaug
from metaaug.cli.app import app
from metaaug.errors import ConfigError
from metaaug.methods import JobContext, MethodResult, QDropConfig, method_config, method_names, register_method
from metaaug.methods.registry import _HANDLERS, handler_for

runner = CliRunner()


@dataclass
class ScaleOnlyConfig:
    """A toy method registered from outside the package: round-to-nearest with the activation steps observed."""

    name: ClassVar[str] = "scaleonly"
    observe: int = 32


def scale_only(qmodel, cfg: ScaleOnlyConfig, ctx: JobContext) -> MethodResult:
    for aq in qmodel.act_quantizers():
        aq.observing = True
    qmodel.set_quant(True, False)
    with torch.no_grad():
        qmodel(ctx.images[: cfg.observe].to(ctx.device))
    for aq in qmodel.act_quantizers():
        aq.finish_observing()
    ctx.progress.start(qmodel.unit_names)
    return MethodResult(qmodel, [], {"observed": min(cfg.observe, len(ctx.images)), "had_labels": ctx.labels is not None})


@pytest.fixture
def registered():
    register_method(ScaleOnlyConfig)(scale_only)
    yield
    _HANDLERS.pop(ScaleOnlyConfig)


def test_builtin_methods_and_inheritance():
    assert method_names() == ["rtn", "adaround", "brecq", "qdrop", "metaaug"]

    @dataclass
    class MyQDrop(QDropConfig):  # a user's subclass runs on its parent's handler
        quant_prob: float = 0.3

    assert handler_for(MyQDrop()) is handler_for(QDropConfig())
    with pytest.raises(ConfigError, match="no method is registered for config type"):
        method_config(ScaleOnlyConfig())


def test_a_new_method_runs_through_api_pipeline_and_cli(registered, tmp_path, small_data):
    assert "scaleonly" in method_names()
    qmodel = metaaug.quantize(metaaug.models.build_model("resnet20"), torch.randn(16, 1, 28, 28), ScaleOnlyConfig(), device="cpu")
    assert all(bool(aq.initialized) for aq in qmodel.act_quantizers()) and not hasattr(qmodel, "engine")
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "--method", "scaleonly", "--set", "observe=8", "--calib-size", "20",
                              "--data-dir", str(small_data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "scaleonly" and report["observed"] == 8 and report["had_labels"] and report["iters"] is None
    assert json.loads((out / "config.json").read_text())["method_config"] == {"method": "scaleonly",
                                                                            **dataclasses.asdict(ScaleOnlyConfig(observe=8))}
