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
from metaaug.quant.layers import QuantLayer
from metaaug.quant.prepare import QuantModel, QuantSpec, prepare
from metaaug.quant.quantizers import ActQuantizer, WeightQuantizer, check_bits, lp_search_channel, lp_search_tensor, lsq_fake_quant, nearest_index

Width = tuple[int, int]  # (weight bits, activation bits)


def width_name(width: Width | None) -> str:
    return "fp" if width is None else f"w{width[0]}a{width[1]}"


def _act_bounds(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _interpolate(bits: int, known: list[int], value) -> torch.Tensor:
    """Linear interpolation in bits between the trained neighbours of an unseen width (the nearest one outside)."""
    lower = [b for b in known if b < bits]
    upper = [b for b in known if b > bits]
    if not lower or not upper:
        return value(max(lower) if lower else min(upper))
    lo, hi = max(lower), min(upper)
    t = (bits - lo) / (hi - lo)
    return (1 - t) * value(lo) + t * value(hi)


class WeightBank(nn.Module):
    """Per-output-channel asymmetric weight quantizer for several widths.

    Per width (default): a learned step for each trained width, zero points fixed at their Lp-optimal start.
    Shared: one learned clipping range per channel; each width's step is range / (2^b - 1), so every width
    trains the same parameter. An unseen width interpolates the trained clipping ranges. Steps and ranges are
    learned as logarithms: an Adam step is then a relative change, the same for an 8-bit step of 1e-4 and a 2-bit
    step of 0.1 (learned directly, Adam's absolute steps drove 8-bit steps negative at a learning rate of 5e-3).
    """

    def __init__(self, w: torch.Tensor, widths: Iterable[int], shared: bool) -> None:
        super().__init__()
        self.widths = sorted(set(widths))
        self.shared = shared
        self.bits: int | None = None  # the width in use (set by QATModel.set_width)
        shape = (w.shape[0],) + (1,) * (w.dim() - 1)
        if shared:
            ref = self.widths[len(self.widths) // 2]
            s, z = lp_search_channel(w.detach(), ref)
            self.log_range = nn.Parameter((s.reshape(shape) * (2**ref - 1)).log())
            self.register_buffer("low", (z / (2**ref - 1)).reshape(shape))
        else:
            self.log_steps = nn.ParameterDict()
            for b in self.widths:
                s, z = lp_search_channel(w.detach(), b)
                self.log_steps[str(b)] = nn.Parameter(s.reshape(shape).log())
                self.register_buffer(f"zp{b}", z.reshape(shape))

    def qparams(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) at `bits`; differentiable in the learned parameters."""
        levels = 2**bits - 1
        if self.shared:
            return self.log_range.exp() / levels, (self.low * levels).round()
        if bits in self.widths:
            return self.log_steps[str(bits)].exp(), getattr(self, f"zp{bits}")
        rng = _interpolate(bits, self.widths, lambda b: self.log_steps[str(b)].exp() * (2**b - 1))
        low = _interpolate(bits, self.widths, lambda b: getattr(self, f"zp{b}") / (2**b - 1))
        return rng / levels, (low * levels).round()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zp = self.qparams(self.bits)
        return nearest_index(w, scale, zp, 2**self.bits - 1) * scale

    def fixed(self, bits: int) -> WeightQuantizer:
        """The post-training quantizer of this layer at `bits` (round-to-nearest), on the bank's device."""
        scale, zp = self.qparams(bits)
        wq = WeightQuantizer(bits, scale.shape[0], scale.dim()).to(scale.device)
        wq.scale.data = scale.detach().clone()
        wq.zero_point.copy_(zp.detach())
        return wq


class ActBank(nn.Module):
    """Per-tensor LSQ activation quantizer for several widths (unsigned when the tensor is non-negative); steps or the
    shared range learned as logarithms, as in `WeightBank`."""

    def __init__(self, x: torch.Tensor, widths: Iterable[int], shared: bool, consumers: list[str], edge: bool) -> None:
        super().__init__()
        self.widths = sorted(set(widths))
        self.shared = shared
        self.consumers, self.edge = consumers, edge  # readers of the tensor; edge: the last layer's input
        self.bits: int | None = None  # None: pass through (FP)
        self.register_buffer("signed", torch.tensor(bool(x.min() < 0)))
        if shared:
            ref = self.widths[len(self.widths) // 2]
            lo, hi = self.bounds(ref)
            self.log_range = nn.Parameter((lp_search_tensor(x, lo, hi) * hi).log())
        else:
            self.log_steps = nn.ParameterDict({str(b): nn.Parameter(lp_search_tensor(x, *self.bounds(b)).log())
                                               for b in self.widths})

    def bounds(self, bits: int) -> tuple[int, int]:
        return _act_bounds(bits, bool(self.signed))

    def scale(self, bits: int) -> torch.Tensor:
        hi = self.bounds(bits)[1]
        if self.shared:
            return self.log_range.exp() / hi
        if bits in self.widths:
            return self.log_steps[str(bits)].exp()
        return _interpolate(bits, self.widths, lambda b: self.log_steps[str(b)].exp() * self.bounds(b)[1]) / hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        lo, hi = self.bounds(self.bits)
        return lsq_fake_quant(x, self.scale(self.bits), lo, hi)

    def fixed(self, bits: int) -> ActQuantizer:
        """The post-training quantizer of this tensor at `bits`, on the bank's device."""
        scale = self.scale(bits).detach()
        aq = ActQuantizer(bits).to(scale.device)
        aq.signed.fill_(bool(self.signed))
        aq.scale.data = scale.clone().reshape(1)
        aq.initialized.fill_(True)
        aq.consumers = list(self.consumers)
        return aq


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
        for aq in self.qnet.act_quantizers():
            aq.observing = True
        with torch.no_grad():
            self.qnet(calib)
        observed = {}
        for name, aq in self.qnet.named_modules():
            if isinstance(aq, ActQuantizer):
                observed[name] = torch.cat(aq._observed)
        _replace(self.qnet, ActQuantizer, lambda name, aq: ActBank(
            observed[name], [edge_bits] if set(aq.consumers) & last else abits, shared, aq.consumers, bool(set(aq.consumers) & last)))
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
                layers[path].abits = aq.bits
        for p in qmodel.parameters():
            p.requires_grad_(False)
        qmodel.set_quant(True, True)
        return qmodel.eval()
