"""The bundled models with their block classes renamed, as a user's own copy would name them.

Unit discovery must find the same blocks: it reads the traced graph, not class names. Load with
`--model bench/renamed_models.py:resnet20_renamed --weights src/metaaug/models/weights/resnet20_fmnist.safetensors`.
"""

from __future__ import annotations

from torch import nn

from metaaug.models.mobilenet import mobilenetv2
from metaaug.models.resnet import resnet20


def _rename(model: nn.Module, old: str, new: str) -> nn.Module:
    for m in model.modules():
        if type(m).__name__ == old:
            m.__class__ = type(new, (type(m),), {"__doc__": f"{old}, renamed"})
    return model


def resnet20_renamed() -> nn.Module:
    """ResNet-20 whose `BasicBlock`s are called `ResUnit`."""
    return _rename(resnet20(), "BasicBlock", "ResUnit")


def mobilenetv2_renamed() -> nn.Module:
    """MobileNetV2 whose `InvertedResidual`s are called `InvRes`."""
    return _rename(mobilenetv2(), "InvertedResidual", "InvRes")
