"""Reconstruction units come from the traced graph: residual/concat regions and multi-layer modules, whatever the
classes are called; renamed copies of the bundled models get the same units; a fallback warns once."""

import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import TinyNet, randomize_bn
from metaaug.cli.app import app
from metaaug.models.mobilenet import mobilenetv2
from metaaug.models.resnet import resnet20
from metaaug.quant import QuantSpec, prepare

runner = CliRunner()


def renamed(factory, old: str, new: str):
    """The same model with its block class renamed: unit discovery must not care what classes are called."""
    def build():
        model = factory()
        for m in model.modules():
            if type(m).__name__ == old:
                m.__class__ = type(new, (type(m),), {})
        assert not any(type(m).__name__ == old for m in model.modules())
        return model
    return build


def plans(model, units="block"):
    q = prepare(randomize_bn(model), QuantSpec(2, 4), units)
    return q, [(p.name, p.found, len(p.layers)) for p in q.unit_plans]


def test_bundled_resnet20_units():
    _, got = plans(resnet20())
    blocks = [(f"layer{s}.{b}", "residual", 3 if s > 1 and b == 0 else 2) for s in (1, 2, 3) for b in range(3)]
    assert got == [("conv1", "layer", 1), *blocks, ("fc", "layer", 1)]


def test_bundled_mobilenetv2_units():
    _, got = plans(mobilenetv2())
    # features_.1/3/5/6/8 have a skip (residual); 2/4/7 change shape, so they are 3-layer modules without one
    expected = [("features_.0.0", "layer", 1), ("features_.1", "residual", 2)]
    expected += [(f"features_.{i}", "residual" if i in (3, 5, 6, 8) else "module", 3) for i in range(2, 9)]
    expected += [("features_.9.0", "layer", 1), ("classifier", "layer", 1)]
    assert got == expected


@pytest.mark.parametrize(("factory", "old", "new"), [
    (resnet20, "BasicBlock", "ResUnit"), (mobilenetv2, "InvertedResidual", "InvRes")])
def test_renamed_block_classes_give_identical_units(factory, old, new):
    torch.manual_seed(0)
    a, got_a = plans(factory())
    torch.manual_seed(0)
    b, got_b = plans(renamed(factory, old, new)())
    assert got_a == got_b
    assert [a.unit(i).code for i in range(len(got_a))] == [b.unit(i).code for i in range(len(got_b))]


class VGG(nn.Module):
    """A plain chain in two stage modules: no skip anywhere, so stages group by the module that owns them."""

    def __init__(self) -> None:
        super().__init__()
        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(stage(1, 4), stage(4, 8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_vgg_stages_group_by_owner_module():
    _, got = plans(VGG())
    assert got == [("features.0", "module", 2), ("features.1", "module", 2), ("head", "module", 2)]


def test_flat_chain_falls_back_to_layers_and_warns_once_with_advice():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 24 * 24, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, got = plans(net)
    assert got == [("0", "layer", 1), ("2", "layer", 1), ("5", "layer", 1)]
    msgs = [str(w.message) for w in caught if "one unit per Conv/Linear" in str(w.message)]
    assert len(msgs) == 1 and "--units" in msgs[0]


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, growth, 3, padding=1, bias=False), nn.BatchNorm2d(growth)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class DenseBlock(nn.Module):
    def __init__(self, cin: int, growth: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block1 = DenseBlock(4, 4, 3)
        self.trans = nn.Sequential(nn.Conv2d(16, 8, 1), nn.AvgPool2d(2))
        self.block2 = DenseBlock(8, 4, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(torch.relu(self.stem(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Mixed(nn.Module):
    """Inception-style: three branches from one tensor, concatenated (in the parent's forward, not a block's)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(c, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, 4, 1))

    def forward(self, x):
        return torch.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1))


class InceptionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.mix1, self.mix2 = Mixed(8), Mixed(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.mix2(self.mix1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class FlatResidual(nn.Module):
    """A skip written in the root's forward: the region has no module of its own, so it is named by its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Linear(4, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.b(torch.relu(self.a(x))) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize(("model", "expected"), [
    (DenseNet, [("stem", "layer", 1), ("block1", "concat", 3), ("trans.0", "layer", 1), ("block2", "concat", 2), ("fc", "layer", 1)]),
    (InceptionNet, [("stem", "layer", 1), ("mix1", "concat", 4), ("mix2", "concat", 4), ("fc", "layer", 1)]),
    (FlatResidual, [("stem", "layer", 1), ("a..b", "residual", 2), ("fc", "layer", 1)]),
])
def test_concat_and_unowned_regions(model, expected):
    torch.manual_seed(0)
    net = model()
    q, got = plans(net)
    assert got == expected
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(q(x), net(x), atol=1e-5)  # the split graph still computes the model


def test_named_units_override_discovery():
    _, got = plans(TinyNet(), ["block2"])
    assert got == [("stem", "layer", 1), ("block1.conv1", "layer", 1), ("block1.conv2", "layer", 1), ("block2", "named", 2),
                   ("fc", "layer", 1)]


def test_cli_on_renamed_model_finds_blocks_and_reports_them(tmp_path, small_data):
    src = tmp_path / "renamed.py"
    src.write_text("import torch\nfrom metaaug.models.mobilenet import mobilenetv2\n\n"
                   "def build():\n    m = mobilenetv2()\n    for mod in m.modules():\n"
                   "        if type(mod).__name__ == 'InvertedResidual':\n            mod.__class__ = type('InvRes', (type(mod),), {})\n"
                   "    return m\n")
    from metaaug.models.registry import bundled_weights

    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "--model", f"{src}:build", "--weights", str(bundled_weights("mobilenetv2")),
                              "--method", "rtn", "--calib-size", "32", "--iters", "0", "--data-dir", str(small_data),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "falling back" not in res.output and "one unit per Conv/Linear" not in res.output
    import json

    report = json.loads((out / "report.json").read_text())
    found = {u["name"]: u["found"] for u in report["unit_plan"]}
    assert found["features_.1"] == "residual" and found["features_.2"] == "module" and len(found) == 11
