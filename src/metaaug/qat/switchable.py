"""One set of weights, many bit-widths: quantizers whose width switches at run time, and the QAT model around any
`nn.Module`.

The QAT model is the `prepare()`d fake-quant model itself (BatchNorm kept unfolded, weights made trainable) with each
weight and activation quantizer swapped for a bank that holds the parameters of every candidate width. So the
quantizers sit exactly where post-training quantization puts them (one per tensor, shared by all its readers,
skip connections included), and a width materializes as an ordinary `QuantModel` (`materialize`) that the
evaluators and exporters take as it is and that computes exactly what the QAT model computes at that width.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from metaaug.errors import ConfigError
from metaaug.quant.grids import act_bounds, act_fake_quant, act_span, host_bool, rtn_fake_quant, signed_for
from metaaug.quant.layers import QuantLayer
from metaaug.quant.lp import act_step, weight_qparams
from metaaug.quant.observe import observing
from metaaug.quant.prepare import QuantModel, QuantSpec, prepare
from metaaug.quant.quantizers import ActQuantizer, WeightQuantizer, check_bits
from metaaug.quant.steps import SwitchableSteps, interpolate

Width = tuple[int, int]  # (weight bits, activation bits)


def width_name(width: Width | None) -> str:
    return "fp" if width is None else f"w{width[0]}a{width[1]}"


class WeightBank(SwitchableSteps, nn.Module):
    """Per-output-channel asymmetric round-to-nearest weight quantizer for several widths.

    Steps per width or one shared clipping range (`SwitchableSteps`); zero points fixed at their Lp-optimal start
    (per width `zp<b>`, shared: the range's low end as a fraction, `low`).
    """

    def __init__(self, w: torch.Tensor, widths: Iterable[int], shared: bool) -> None:
        super().__init__()
        self.widths = sorted(set(widths))
        self.shared = shared
        self.bits: int | None = None  # the width in use (set by QATModel.set_width)
        searched = {b: weight_qparams(w, b) for b in self.searched_widths()}
        self.init_steps({b: s for b, (s, _) in searched.items()})
        if shared:
            ref = self.reference_width
            self.register_buffer("low", searched[ref][1] / (2**ref - 1))
        else:
            for b, (_, z) in searched.items():
                self.register_buffer(f"zp{b}", z)

    def span(self, bits: int) -> int:
        return 2**bits - 1

    def qparams(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) at `bits`; differentiable in the learned parameters."""
        scale = self.step(bits)
        if self.shared:
            return scale, (self.low * self.span(bits)).round()
        if bits in self.widths:
            return scale, getattr(self, f"zp{bits}")
        low = interpolate(bits, self.widths, lambda b: getattr(self, f"zp{b}") / self.span(b))
        return scale, (low * self.span(bits)).round()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zp = self.qparams(self.bits)
        return rtn_fake_quant(w, scale, zp, self.bits)

    def fixed(self, bits: int) -> WeightQuantizer:
        """The post-training quantizer of this layer at `bits` (round-to-nearest), on the bank's device."""
        scale, zp = self.qparams(bits)
        wq = WeightQuantizer(bits, scale.shape[0], scale.dim()).to(scale.device)
        wq.scale.data = scale.detach().clone()
        wq.zero_point.copy_(zp.detach())
        return wq


class ActBank(SwitchableSteps, nn.Module):
    """Per-tensor LSQ activation quantizer for several widths on the grid of the quantizer it replaces (uniform:
    unsigned when the tensor is non-negative; or log2); steps per width or one shared range (`SwitchableSteps`)."""

    def __init__(self, x: torch.Tensor, widths: Iterable[int], shared: bool, consumers: list[str], edge: bool,
                 grid: str = "uniform") -> None:
        super().__init__()
        self.widths = sorted(set(widths))
        self.shared = shared
        self.grid = grid
        self.consumers, self.edge = consumers, edge  # readers of the tensor; edge: the last layer's input
        self.bits: int | None = None  # None: pass through (FP)
        self.register_buffer("signed", torch.tensor(signed_for(x)))
        self.init_steps({b: act_step(x, b, bool(self.signed), grid) for b in self.searched_widths()})

    def bounds(self, bits: int) -> tuple[int, int]:
        return act_bounds(bits, bool(self.signed))

    def span(self, bits: int) -> int:
        return act_span(bits, bool(self.signed), self.grid)

    def scale(self, bits: int) -> torch.Tensor:
        return self.step(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        return act_fake_quant(x, self.scale(self.bits), self.bits, host_bool(self, "signed"), self.grid)

    def fixed(self, bits: int) -> ActQuantizer:
        """The post-training quantizer of this tensor at `bits` (same grid), on the bank's device."""
        scale = self.scale(bits).detach()
        aq = ActQuantizer(bits, grid=self.grid).to(scale.device)
        aq.signed.fill_(bool(self.signed))
        aq.scale.data = scale.clone().reshape(1)
        aq.initialized.fill_(True)
        aq.consumers = list(self.consumers)
        return aq

    def extra_repr(self) -> str:
        return f"widths={self.widths}, shared={self.shared}, signed={bool(self.signed)}, grid={self.grid}"


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _replace(root: nn.Module, old: type, make) -> None:
    """Swap every submodule of type `old` for `make(name, module)`."""
    for name, mod in list(root.named_modules()):
        if isinstance(mod, old):
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, attr, make(name, mod))


class QATModel(nn.Module):
    """A trainable prepared model whose quantizers are width banks; `set_width((w, a))`, or `None` for FP.

    First and last layers stay at `edge_bits` (the setting of the post-training baselines), as `prepare` does.
    BatchNorm statistics per width live in `bn_stats` (re-estimated after training, see `recalibrate_bn`).
    """

    def __init__(self, net: nn.Module, wbits: Iterable[int], abits: Iterable[int], calib: torch.Tensor,
                 shared: bool = False, edge_bits: int = 8) -> None:
        super().__init__()
        wbits, abits = sorted(set(wbits)), sorted(set(abits))
        for b in [*wbits, *abits, edge_bits]:
            check_bits(b)
        self.edge_bits = edge_bits
        self.qnet = prepare(net, QuantSpec(wbits[0], abits[0], edge_bits, fold_bn=False), "layer", calib)
        last = {ql.path for ql in self.qnet.quant_layers() if ql.edge == "last"}
        with torch.no_grad(), observing(self.qnet.act_quantizers(), init=False) as observed:
            self.qnet(calib)
        _replace(self.qnet, ActQuantizer, lambda _, aq: ActBank(
            observed[aq], [edge_bits] if set(aq.consumers) & last else abits, shared, aq.consumers, bool(set(aq.consumers) & last),
            aq.grid))
        for ql in self.qnet.quant_layers():
            ql.layer.weight.requires_grad_(True)
            if ql.layer.bias is not None:
                ql.layer.bias.requires_grad_(True)
            ql.wq = WeightBank(ql.layer.weight, [edge_bits] if ql.edge else wbits, shared)
        self.width: Width | None = None
        self.bn_stats: dict[str, dict[str, torch.Tensor]] = {}
        self.set_width(None)

    def weight_banks(self) -> list[tuple[QuantLayer, WeightBank]]:
        return [(ql, ql.wq) for ql in self.qnet.quant_layers()]

    def act_banks(self) -> list[ActBank]:
        return [m for m in self.qnet.modules() if isinstance(m, ActBank)]

    def set_width(self, width: Width | None) -> None:
        if width is not None:
            check_bits(width[0], "weight bit-width")
            check_bits(width[1], "activation bit-width")
        self.width = width
        for ql, bank in self.weight_banks():
            ql.quantize_weight = width is not None
            bank.bits = None if width is None else self.edge_bits if ql.edge else width[0]
        for bank in self.act_banks():
            bank.bits = None if width is None else self.edge_bits if bank.edge else width[1]

    def quantizer_parameters(self) -> list[nn.Parameter]:
        return [p for _, b in self.weight_banks() for p in b.parameters()] + [p for b in self.act_banks() for p in b.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qnet(x)

    # BatchNorm statistics per width
    def bn_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.qnet.state_dict().items()
                if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}

    @torch.no_grad()
    def recalibrate_bn(self, width: Width | None, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Re-estimate every BatchNorm's running statistics at `width` (cumulative average over `images`), store them
        under the width's name and leave them loaded."""
        bns = _batchnorms(self.qnet)
        was, momenta = self.training, [bn.momentum for bn in bns]
        self.eval()
        self.set_width(width)
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for i in range(0, len(images), batch):
            self(images[i : i + batch])
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        self.train(was)
        self.bn_stats[width_name(width)] = self.bn_state()
        return self.bn_stats[width_name(width)]

    def use_width(self, width: Width | None, images: torch.Tensor | None = None) -> None:
        """Switch to `width` with its BatchNorm statistics (re-estimated from `images` if none are stored)."""
        name = width_name(width)
        if name not in self.bn_stats:
            if images is None:
                raise ConfigError(f"no BatchNorm statistics for {name}; calibration images are needed to estimate them")
            self.recalibrate_bn(width, images)
        self.qnet.load_state_dict(self.bn_stats[name], strict=False)
        self.set_width(width)

    def materialize(self, width: Width) -> QuantModel:
        """The prepared fake-quant model of one width (quantization on, eval mode), for eval and the exporters: the
        same graph with each bank replaced by the post-training quantizer of that width."""
        self.set_width(width)
        qmodel = copy.deepcopy(self.qnet)
        qmodel.load_state_dict(self.bn_stats.get(width_name(width), {}), strict=False)
        _replace(qmodel, ActBank, lambda _, bank: bank.fixed(bank.bits))
        for ql in qmodel.quant_layers():
            ql.wq = ql.wq.fixed(ql.wq.bits)
        layers = {ql.path: ql for ql in qmodel.quant_layers()}
        for aq in qmodel.act_quantizers():
            for path in aq.consumers:
                if path in layers:  # not the matmul or GELU readers of attention blocks
                    layers[path].abits = aq.bits
        for p in qmodel.parameters():
            p.requires_grad_(False)
        qmodel.set_quant(True, True)
        return qmodel.eval()
