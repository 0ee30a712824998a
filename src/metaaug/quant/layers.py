"""Drop-in quantized Conv2d / Linear: the FP layer plus a weight quantizer (Brevitas-style wrapper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaaug.quant.quantizers import WeightQuantizer

SUPPORTED = (nn.Conv2d, nn.Linear)


class QuantLayer(nn.Module):
    """Wraps a Conv2d or Linear; its FP weight stays frozen and the quantizer decides what the forward sees."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, bits: int) -> None:
        super().__init__()
        if not isinstance(layer, SUPPORTED):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, not {type(layer).__name__}")
        self.layer = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        self.wq = WeightQuantizer(bits, layer.weight.shape[0], layer.weight.dim())
        self.wq.init_scale(layer.weight)
        self.quantize_weight = False
        self.path = ""  # module path in the original model (set by prepare; policies and costs are keyed by it)
        self.abits: int | None = None  # bits of the input activation; None where the input is the raw image
        self.edge: str | None = None  # "first" (reads the image) or "last" (its output is the model's), else None

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def qweight(self) -> torch.Tensor:
        return self.wq(self.layer.weight) if self.quantize_weight else self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)
