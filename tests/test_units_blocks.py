"""Blocks without a skip (EfficientNet's MBConv: a chain plus its squeeze-excitation gate) are one unit each; a
multi-layer module that still ends up in pieces is named in one warning; blocks with a skip keep their units."""

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import randomize_bn
from metaaug.errors import MetaAugWarning
from metaaug.models.registry import build_model
from metaaug.quant.prepare import QuantSpec, prepare
from metaaug.quant.units import warn_fallback

MODELS_FILE = Path(__file__).parents[1] / "bench" / "imagenet" / "models.py"


def bench_models():
    spec = importlib.util.spec_from_file_location("imagenet_bench_models", MODELS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepared(model, units="block"):
    """Prepare with every warning recorded: (plans as (name, found, n_layers), split warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = prepare(model, QuantSpec(2, 4), units)
    split = [str(w.message) for w in caught if issubclass(w.category, MetaAugWarning) and "split across" in str(w.message)]
    return q, [(p.name, p.found, len(p.layers)) for p in q.unit_plans], split


def cbs(cin: int, cout: int, k: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.SiLU()) if act else nn.Sequential(*layers)


class SE(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.pool, self.fc1, self.act, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, squeeze, 1), nn.SiLU(), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc2(self.act(self.fc1(self.pool(x))))) * x


class MBConvNoSkip(nn.Module):
    """Expand, depthwise, SE, project, and no skip (the channels change)."""

    def __init__(self, cin: int, cout: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand, self.dw = cbs(cin, hidden), cbs(hidden, hidden, 3, groups=hidden)
        self.se, self.project = SE(hidden, 2), cbs(hidden, cout, act=False)

    def forward(self, x):
        return self.project(self.se(self.dw(self.expand(x))))


class MBNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 4, 3, padding=1), MBConvNoSkip(4, 6), nn.Linear(6, 10)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_mbconv_without_skip_is_one_unit_that_says_so():
    torch.manual_seed(0)
    net = randomize_bn(MBNet()).eval()
    q, got, split = prepared(net)
    assert got == [("stem", "layer", 1), ("block", "module+gate", 5), ("fc", "layer", 1)]
    assert not split
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(q(x), net(x), atol=1e-5)  # the SE's product stays inside the block's unit


class PartialSkip(nn.Module):
    """A skip around the middle conv only: the module is a conv, a residual region and a conv, never one unit."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x)) + x
        return self.conv3(x)


class SplitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.fc = nn.Conv2d(3, 4, 3, padding=1), PartialSkip(4), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(torch.relu(self.stem(x))), 1), 1))


def test_split_module_warns_once_naming_it():
    _, got, split = prepared(SplitNet())
    assert [name for name, _, _ in got] == ["stem", "body.conv1", "body.conv2..body.conv2", "body.conv3", "fc"]
    assert len(split) == 1
    assert "'body'" in split[0] and "--units body" in split[0] and "units=['body']" in split[0]
    _, named, split = prepared(SplitNet(), ["body"])  # the advice works, and naming units does not warn
    assert ("body", "named", 3) in named and not split


def test_fallback_warning_is_a_metaaug_warning():
    with pytest.warns(MetaAugWarning, match="one unit per Conv/Linear"):
        warn_fallback("Flat")


def test_bench_efficientnet_b0_has_one_unit_per_mbconv_block():
    models = bench_models()
    torch.manual_seed(0)
    net = randomize_bn(models.efficientnet_b0(num_classes=10)).eval()
    blocks = [name for name, m in net.named_modules() if isinstance(m, models.MBConv)]
    q, got, split = prepared(net)
    assert len(blocks) == 16 and not split
    # stem conv, one unit per MBConv block (7 without a skip, 9 with one), head conv, classifier: 39 units before
    assert len(got) == len(blocks) + 3
    per_stage = [["module+gate"] + ["residual"] * (n - 1) for n in (1, 2, 2, 3, 3, 4, 1)]  # first block: no skip
    assert [f for _, f, _ in got] == ["layer", *(f for stage in per_stage for f in stage), "layer", "layer"]
    for path in blocks:  # each block's layers are exactly one unit's
        layers = {n for n, m in net.named_modules() if n.startswith(path + ".") and isinstance(m, nn.Conv2d)}
        assert [set(p.layers) for p in q.unit_plans if set(p.layers) & layers] == [layers], path
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(q(x), net(x), atol=1e-4)


def test_bundled_models_keep_their_block_units_and_do_not_warn():
    _, got, split = prepared(build_model("resnet20"))
    assert not split and len(got) == 11
    assert [f for _, f, _ in got] == ["layer", *["residual"] * 9, "layer"]
    assert [n for n, _, _ in got[1:-1]] == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    _, got, split = prepared(build_model("mobilenetv2"))
    assert not split and len(got) == 11
    assert [f for _, f, _ in got[1:-2]] == ["residual", "module", "residual", "module", "residual", "residual", "module", "residual"]
