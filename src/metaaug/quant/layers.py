"""Drop-in quantized Conv2d / Linear: the FP layer plus a weight quantizer (Brevitas-style wrapper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaaug.quant.quantizers import ActQuantizer, WeightQuantizer

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


class QuantMatmul(nn.Module):
    """`a @ b` between two activations (attention's QK^T and attn.V), each input through its own activation quantizer.

    `role` is "qk" or "av" where the graph shows which (the first input of "av" is a softmax output), else "matmul".
    """

    def __init__(self, qa: ActQuantizer, qb: ActQuantizer, role: str) -> None:
        super().__init__()
        self.qa, self.qb, self.role = qa, qb, role
        self.path = ""  # where it sits in the prepared model (set by prepare; reports and costs name it)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.qa(a), self.qb(b))


class ParamRef(nn.Module):
    """A parameter or buffer that the forward reads directly (class token, position embedding, layer scale, a
    functional LayerNorm's weight) as a module call, so that splitting the graph keeps it inside the unit reading it
    instead of passing it between units as if it were a batch of activations."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        if isinstance(value, nn.Parameter):
            self.value = value
        else:
            self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value
