"""Per-layer bit-widths: policy JSON -> prepared model -> report -> packed file -> rebuilt model; the cost model
against a hand count; bad policies as one-line errors."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from metaaug.cli.app import app
from metaaug.errors import ConfigError
from metaaug.export.pack import load_quantized
from metaaug.models.resnet import resnet20
from metaaug.quant import QuantSpec, prepare
from metaaug.quant.cost import model_cost
from metaaug.quant.policy import LayerBits, Policy

runner = CliRunner()


def layer_names(model):
    return [ql.path for ql in prepare(model, QuantSpec(), "layer").quant_layers()]


def mixed_resnet_policy() -> Policy:
    """W3 in stage 1, W2 elsewhere, A3 into stage 3, first/last 8-bit; shared inputs get equal abits."""
    out = {}
    for name in layer_names(resnet20()):
        w = 8 if name in ("conv1", "fc") else 3 if name.startswith("layer1") else 2
        a = 8 if name in ("conv1", "fc") else 3 if name.startswith("layer3") and name != "layer3.0.conv1" and "downsample" not in name else 4
        out[name] = LayerBits(w, a)
    return Policy(out)


def test_cost_model_matches_a_hand_count():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    q = prepare(net, QuantSpec(policy=Policy({"0": LayerBits(4, 8), "3": LayerBits(2, 3)})), "layer")
    c = model_cost(q, torch.zeros(1, 1, 4, 4))
    # conv: 8 outputs x 9 MACs = 72, 18 weights + 2 channels x (32-bit scale + 8-bit zero-point) + 2 FP32 biases
    # linear: 24 MACs, 24 weights, 3 channels, 3 biases
    assert [(r["macs"], r["params"]) for r in c["layers"]] == [(72, 18), (24, 24)]
    assert c["weight_bits"] == (18 * 4 + 2 * 40 + 2 * 32) + (24 * 2 + 3 * 40 + 3 * 32) == 480
    assert c["bops"] == 72 * 4 * 8 + 24 * 2 * 3 == 2448  # the image counts as 8-bit
    assert c["weight_vs_fp32"] == round(480 / ((18 + 2 + 24 + 3) * 32), 4)
    assert c["bops_vs_w8a8"] == round(2448 / ((72 + 24) * 64), 4)
    assert c["avg_wbits"] == round((18 * 4 + 24 * 2) / 42, 4)


def test_policy_sets_every_layer_and_shared_quantizer():
    pol = mixed_resnet_policy()
    q = prepare(resnet20(), QuantSpec(policy=pol))
    for ql in q.quant_layers():
        assert ql.wq.bits == pol.layers[ql.path].wbits
        if ql.abits is not None:
            assert ql.abits == pol.layers[ql.path].abits
    assert {aq.bits for aq in q.act_quantizers()} == {3, 4, 8}


def test_uniform_policy_equals_uniform_spec():
    names = layer_names(resnet20())
    pol = Policy.uniform(names, 2, 4, first=names[0], last=names[-1])
    model = resnet20()
    a, b = prepare(model, QuantSpec(2, 4)), prepare(model, QuantSpec(2, 4, policy=pol))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert [x.bits for x in a.act_quantizers()] == [y.bits for y in b.act_quantizers()]


def test_policy_round_trip_through_run_report_and_packed_file(tmp_path, small_data):
    pol = mixed_resnet_policy()
    path, out = tmp_path / "policy.json", tmp_path / "run"
    pol.save(path)
    res = runner.invoke(app, ["quantize", "--policy", str(path), "--method", "qdrop", "--iters", "2", "--calib-size", "32",
                              "--data-dir", str(small_data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["policy"] == json.loads(path.read_text())
    assert {r["name"]: r["wbits"] for r in report["cost"]["layers"]} == {k: v.wbits for k, v in pol.layers.items()}
    assert 2.0 < report["cost"]["avg_wbits"] < 3.0
    res = runner.invoke(app, ["export", "--run", str(out), "--format", "packed", "--data-dir", str(small_data)])
    assert res.exit_code == 0, res.output  # the export job fails unless the rebuilt model's logits are identical
    rebuilt = load_quantized(next(out.glob("*.mq.safetensors")))
    assert {ql.path: ql.wq.bits for ql in rebuilt.quant_layers()} == {k: v.wbits for k, v in pol.layers.items()}
    res = runner.invoke(app, ["eval", "--run", str(out)])
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["reproduced"]
    res = runner.invoke(app, ["export", "--run", str(out), "--format", "onnx", "--data-dir", str(small_data), "--limit", "200"])
    assert res.exit_code == 0, res.output  # per-layer QDQ containers; fails unless onnxruntime agrees with PyTorch


def write(tmp_path, data) -> str:
    path = tmp_path / "p.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def uniform_dict(**change):
    layers = {n: {"wbits": 4, "abits": 4} for n in layer_names(resnet20())}
    layers.update(change)
    return {"layers": layers}


@pytest.mark.parametrize(("data", "message"), [
    (lambda: uniform_dict(**{"layer9.conv": {"wbits": 4, "abits": 4}}), "policy names layer 'layer9.conv', which is not a quantized layer"),
    (lambda: {"layers": {"conv1": {"wbits": 4, "abits": 4}}}, "policy has no bits for layer 'layer1.0.conv1'"),
    (lambda: uniform_dict(fc={"wbits": 1, "abits": 4}), "policy wbits of layer 'fc' must be an integer in 2..8"),
    (lambda: uniform_dict(fc={"wbits": 4, "abits": 9}), "policy abits of layer 'fc' must be an integer in 2..8"),
    (lambda: uniform_dict(**{"layer2.0.conv1": {"wbits": 4, "abits": 2}}), "different abits to layers that read the same tensor"),
    (lambda: "{not json", "is not valid JSON"),
    (lambda: {"bits": {}}, "must be a JSON object"),
])
def test_bad_policy_is_one_line(tmp_path, data, message):
    res = runner.invoke(app, ["quantize", "--policy", write(tmp_path, data()), "--method", "rtn", "--calib-size", "32",
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "run" / "config.json").exists()


def test_cost_command_prints_and_writes_a_template(tmp_path):
    out = tmp_path / "template.json"
    res = runner.invoke(app, ["cost", "--model", "resnet20", "--wbits", "3", "--abits", "4", "--write-policy", str(out)])
    assert res.exit_code == 0, res.output
    assert "vs W8A8" in res.output
    pol = Policy.load(out)
    assert pol.layers["layer1.0.conv1"] == LayerBits(3, 4) and pol.layers["fc"] == LayerBits(8, 8)
    with pytest.raises(ConfigError, match="no bits for layer"):
        prepare(resnet20(), QuantSpec(policy=Policy({"fc": LayerBits(8, 8)})))
