"""MetaQuantNet (Wang et al. 2020, seed 002): one network that generates a model's quantized weights for any
per-layer bit-width policy, trained once by distillation from the FP model, so a search can score thousands of
policies without optimising any of them.

The paper gives no architecture; this one follows MetaPruning's per-layer generator, made residual so training
starts at the FP model: each searchable layer's weight is `w_fp + std(w_fp) * G_l(e(b))` with `G_l = Linear(k, h)
-> ReLU -> Linear(h, numel)` (last layer zero-initialised) and `e(b)` a learned embedding of the layer's weight
bits; the result goes through a per-channel round-to-nearest quantizer (straight-through) whose step is learned
per (layer, bits), in log space so one learning rate suits steps of any size. Activation steps are learned per
(quantizer, bits) too (LSQ, also in log space). At its start the network gives
exactly round-to-nearest quantization of the FP weights with Lp-searched steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaaug.config_check import Ranges, check_config
from metaaug.quant.grids import rtn_fake_quant, signed_for
from metaaug.quant.lp import act_step, weight_qparams
from metaaug.quant.observe import observing
from metaaug.quant.policy import Policy
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import MAX_BITS, MIN_BITS, ActQuantizer
from metaaug.quant.steps import WidthSteps
from metaaug.recon.stepper import map_chunks


@dataclass
class MetaQuantConfig:
    """MetaQuantNet training (Wang et al. 2020 give no values; these are ours, measured in bench/search)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    hidden: int = 32
    embed: int = 8
    temperature: float = 1.0
    sandwich: bool = True  # each step also trains the all-lowest and all-highest policies
    RANGES: ClassVar[Ranges] = {"steps": ">= 0", "batch_size": ">= 1", "lr": "> 0", "hidden": ">= 1", "embed": ">= 1",
                                "temperature": "> 0"}

    def __post_init__(self) -> None:
        check_config(self)


class LayerGenerator(nn.Module):
    """`Linear(k, h) -> ReLU -> Linear(h, numel)`, the last layer zero-initialised (MetaPruning's block, residual)."""

    def __init__(self, numel: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(MAX_BITS - MIN_BITS + 1, embed)
        self.fc1 = nn.Linear(embed, hidden)
        self.fc2 = nn.Linear(hidden, numel)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, bits: int) -> torch.Tensor:
        e = self.embed(torch.tensor(bits - MIN_BITS, device=self.fc1.weight.device))
        return self.fc2(F.relu(self.fc1(e)))


def _key(name: str) -> str:
    return name.replace(".", "__")


class MetaQuantNet(nn.Module):
    """Generated, quantized weights and learned activation steps for any policy over a prepared model."""

    def __init__(self, qmodel: QuantModel, calib: torch.Tensor, wchoices: tuple[int, ...], achoices: tuple[int, ...],
                 searchable: list[str], cfg: MetaQuantConfig, fixed_abits: int | None = None) -> None:
        """`fixed_abits`: the bits of quantizers no layer reads (attention matmul and GELU inputs), which no policy
        sets; default the highest activation choice."""
        super().__init__()
        self.qmodel = qmodel.eval()
        for p in qmodel.parameters():
            p.requires_grad_(False)
        self.cfg, self.wchoices, self.achoices = cfg, tuple(wchoices), tuple(achoices)
        self.fixed_abits = fixed_abits if fixed_abits is not None else max(self.achoices)
        self.layers = {ql.path: ql for ql in qmodel.quant_layers()}
        names = {id(m): n for n, m in qmodel.named_modules()}
        self.weight_keys = {path: f"{names[id(ql)]}.layer.weight" for path, ql in self.layers.items()}  # for functional_call
        self.searchable = list(searchable)
        self.gens = nn.ModuleDict({_key(p): LayerGenerator(self.layers[p].weight.numel(), cfg.embed, cfg.hidden)
                                   for p in self.searchable})
        # per layer, log multipliers of the Lp-searched steps (`WidthSteps`, relative): exactly 0 (the RTN step) at start
        self.wscales = nn.ModuleDict()
        self.wzeros: dict[str, torch.Tensor] = {}
        for path, ql in self.layers.items():
            searched = {b: weight_qparams(ql.weight, b) for b in sorted(set(wchoices) | {8})}
            self.wscales[_key(path)] = WidthSteps({b: s for b, (s, _) in searched.items()}, relative=True)
            for b, (_, z) in searched.items():
                self.wzeros[f"{_key(path)}_{b}"] = z.clone()
        self.aqs = {name: aq for name, aq in qmodel.named_modules() if isinstance(aq, ActQuantizer) and aq.consumers}
        self.ascales = nn.ModuleDict()  # per quantizer, learned log steps (`WidthSteps`) on the quantizer's grid
        self._init_act_steps(calib, sorted(set(achoices) | {8, self.fixed_abits}))
        self.register_load_state_dict_pre_hook(_flat_step_keys)

    @torch.no_grad()
    def _init_act_steps(self, calib: torch.Tensor, bits: list[int]) -> None:
        """Observe each quantized tensor on FP inputs once; Lp-search its step for every candidate bit-width."""
        self.qmodel.set_quant(False, False)
        dev = next(self.qmodel.parameters()).device
        with observing(self.aqs.values(), init=False) as samples:
            map_chunks(self.qmodel, (calib[:256],), 128, dev, dev)
        for name, aq in self.aqs.items():
            sample = samples[aq]
            aq.signed.fill_(signed_for(sample))
            aq.initialized.fill_(True)
            self.ascales[_key(name)] = WidthSteps({b: act_step(sample, b, bool(aq.signed), aq.grid).to(dev) for b in bits})

    def weight(self, path: str, bits: int) -> torch.Tensor:
        """The layer's generated weight at `bits`, fake-quantized (straight-through)."""
        w = self.layers[path].weight
        if path in self.searchable:
            w = w + w.std() * self.gens[_key(path)](bits).view_as(w)
        return rtn_fake_quant(w, self.wscales[_key(path)].step(bits), self.wzeros[f"{_key(path)}_{bits}"].to(w.device), bits)

    @contextlib.contextmanager
    def _bits(self, policy: Policy) -> Iterator[dict[str, torch.Tensor]]:
        """Set each activation quantizer's bits for `policy`; yields the parameter overrides for functional_call."""
        overrides: dict[str, torch.Tensor] = {}
        for path, ql in self.layers.items():
            overrides[self.weight_keys[path]] = self.weight(path, policy.layers[path].wbits)
            ql.quantize_weight = False
        saved = {n: aq.bits for n, aq in self.aqs.items()}
        for n, aq in self.aqs.items():
            reader = aq.consumers[0]
            aq.bits = policy.layers[reader].abits if reader in self.layers else self.fixed_abits
            aq.enabled = True
            overrides[f"{n}.scale"] = self.ascales[_key(n)].step(aq.bits)
        try:
            yield overrides
        finally:
            for n, aq in self.aqs.items():
                aq.bits = saved[n]
                aq.enabled = False

    def forward(self, x: torch.Tensor, policy: Policy) -> torch.Tensor:
        with self._bits(policy) as overrides:
            return functional_call(self.qmodel, overrides, (x,))

    @torch.no_grad()
    def fp_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.qmodel.set_quant(False, False)
        return self.qmodel(x)


def _flat_step_keys(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """Read a state saved before the step tables were `WidthSteps` per tensor: `wscales.<layer>_<bits>` (and
    `ascales.`) became `wscales.<layer>.<bits>`."""
    for table in ("wscales", "ascales"):
        head = f"{prefix}{table}."
        for key in [k for k in state_dict if k.startswith(head) and "." not in k[len(head):]]:
            name, bits = key[len(head):].rsplit("_", 1)
            state_dict[f"{head}{name}.{bits}"] = state_dict.pop(key)


def distill_loss(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(FP || generated) on softened logits: no labels needed."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(target / t, 1), log_target=True, reduction="batchmean") * t * t


def train_step(net: MetaQuantNet, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
               policies: list[Policy]) -> float:
    """One optimiser step on the summed distillation loss of `policies` (a random one, plus the sandwich)."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for pol in policies:
        loss = distill_loss(net(x, pol), target, net.cfg.temperature)
        loss.backward()
        total += float(loss.detach())
    opt.step()
    return total / len(policies)
