
import pytest
import torch
from torch import nn

from conftest import TinyNet, randomize_bn
from metaaug.errors import ConfigError, ModelError
from metaaug.models.mobilenet import mobilenetv2
from metaaug.models.resnet import resnet20
from metaaug.quant import QuantSpec, prepare


@pytest.mark.parametrize("factory", [resnet20, mobilenetv2, TinyNet])
def test_bn_folding_is_equivalent_in_fp(factory):
    torch.manual_seed(0)
    model = randomize_bn(factory())
    q = prepare(model, QuantSpec(4, 4))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-4)


def test_no_fold_keeps_batchnorm():
    model = randomize_bn(resnet20())
    q = prepare(model, QuantSpec(4, 4, fold_bn=False))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in q.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_torchvision_style_blocks_are_found_from_the_graph():
    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.c(x) + x

    class Whatever(Bottleneck):
        pass

    net = nn.Sequential(nn.Conv2d(1, 4, 3), Bottleneck(), Whatever(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    q = prepare(net, QuantSpec())
    assert [(p.name, p.found) for p in q.unit_plans] == [("0", "layer"), ("1", "residual"), ("2", "residual"), ("4", "layer")]


def test_layer_units_and_named_units():
    q = prepare(TinyNet(), QuantSpec(), units="layer")
    assert q.unit_names == ["stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "fc"]
    q = prepare(TinyNet(), QuantSpec(), units=["block2"])
    assert q.unit_names == ["stem", "block1.conv1", "block1.conv2", "block2", "fc"]
    with pytest.raises(ConfigError, match="not a submodule"):
        prepare(TinyNet(), QuantSpec(), units=["nope"])


def test_first_and_last_layers_are_8_bit_and_image_is_not_quantized():
    q = prepare(resnet20(), QuantSpec(2, 2))
    layers = list(q.quant_layers())
    assert layers[0].wq.bits == 8 and layers[-1].wq.bits == 8
    assert {layer.wq.bits for layer in layers[1:-1]} == {2}
    acts = list(q.act_quantizers())
    assert acts[-1].bits == 8 and {a.bits for a in acts[:-1]} == {2}
    # the first unit's input is the raw image: no quantizer in front of the stem conv
    assert "aq_" not in q.unit(0).code.split("conv1(")[0]


def test_one_quantizer_per_tensor_shared_by_residual_consumers():
    q = prepare(resnet20(), QuantSpec())
    code = q.unit(2).code  # layer1.1: input feeds conv1 and the identity add
    assert code.count("self.aq_") == 2  # relu1 output and block output; input arrives already quantized


def test_unknown_layer_type_is_named():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(ModelError, match="unknown layer type PReLU at '1'"):
        prepare(net, QuantSpec())


def test_untraceable_model_is_a_clear_error():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else x

    with pytest.raises(ModelError, match="cannot be traced"):
        prepare(Dyn(), QuantSpec())
