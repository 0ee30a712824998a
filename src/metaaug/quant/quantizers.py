"""The post-training quantizers: per-channel weights with AdaRound soft rounding, per-tensor LSQ activations with
QDrop on a uniform or log2 grid. Their grids live in `grids`, step searches in `lp`, observation in `observe`."""

from __future__ import annotations

import torch
from torch import nn

from metaaug.errors import ConfigError
from metaaug.quant.grids import (
    act_bounds,
    act_fake_quant,
    check_grid,
    host_bool,
    keep_mask,
    lsq_fake_quant,
    nearest_index,
    qdrop_mix,
    round_ste,
    rtn_fake_quant,
    signed_for,
)
from metaaug.quant.lp import ACT_P, WEIGHT_P, act_step, lp_search_channel, lp_search_tensor, weight_qparams
from metaaug.quant.observe import OBSERVE_VALUES, subsample

# re-exported: these were defined here before the grids, searches and observation had modules of their own
__all__ = ["ACT_P", "GAMMA", "MAX_BITS", "MIN_BITS", "OBSERVE_VALUES", "WEIGHT_P", "ZETA", "ActQuantizer", "WeightQuantizer",
           "check_bits", "keep_mask", "lp_search_channel", "lp_search_tensor", "lsq_fake_quant", "nearest_index", "qdrop_mix",
           "round_ste"]

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020)
ZETA, GAMMA = 1.1, -0.1
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bit-width") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric quantizer: round-to-nearest, AdaRound soft, or hard-learned rounding.

    The integer weight is `clamp(floor(w/s) + h(V), -z, 2^b - 1 - z)` where `h` is the rectified sigmoid;
    `floor(w/s)` is frozen at rounding init, so a learnable `s` (the Genie-M variant) keeps a fixed grid index.
    """

    MODES = ("nearest", "soft", "hard")

    def __init__(self, bits: int, channels: int, weight_dims: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "weight bit-width")
        shape = (channels,) + (1,) * (weight_dims - 1)
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("w_floor", torch.zeros(0))
        self.alpha = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.mode = "nearest"

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def init_scale(self, w: torch.Tensor, p: float = WEIGHT_P) -> None:
        s, z = weight_qparams(w, self.bits, p)
        self.scale.data = s.reshape(self.scale.shape).to(w)
        self.zero_point.copy_(z.reshape(self.zero_point.shape))

    def init_rounding(self, w: torch.Tensor) -> None:
        """Start AdaRound at the FP value: `h(alpha) = frac(w/s)`."""
        ws = w.detach() / self.scale.detach()
        self.w_floor = ws.floor()
        frac = (ws - self.w_floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.mode = "soft"

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def integer(self, w: torch.Tensor) -> torch.Tensor:
        """The integer grid index `q - z` in [-z, 2^b - 1 - z] (differentiable in soft mode)."""
        if self.mode == "nearest":  # straight-through: a generator of w (MetaQuantNet) or a learned scale gets gradients
            return nearest_index(w, self.scale, self.zero_point, self.levels)
        up = self.h() if self.mode == "soft" else (self.alpha >= 0).to(w.dtype)
        return torch.clamp(self.w_floor + up, -self.zero_point, self.levels - self.zero_point)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return rtn_fake_quant(w, self.scale, self.zero_point, self.bits)
        return self.integer(w) * self.scale

    def harden(self) -> None:
        if self.mode == "soft":
            self.mode = "hard"
        self.alpha.requires_grad_(False)
        self.scale.requires_grad_(False)

    def round_penalty(self, beta: float) -> torch.Tensor:
        """AdaRound regulariser `sum(1 - |2h - 1|^beta)`: pushes h to 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # resize the lazily-shaped rounding tensors so a saved AdaRound state loads into a fresh quantizer
        for name in ("w_floor", "alpha"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                t = torch.empty_like(state_dict[key])
                if name == "alpha":
                    self.alpha = nn.Parameter(t, requires_grad=False)
                else:
                    self.w_floor = t
        if (prefix + "alpha") in state_dict and state_dict[prefix + "alpha"].numel():
            self.mode = "hard"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with a learnable step (LSQ) and QDrop's element-wise drop.

    On the uniform grid (default): unsigned `[0, 2^b - 1]` when the calibration tensor is non-negative, else signed
    symmetric. On the log2 grid (post-softmax tensors): `s * 2^-q`, `q` in `[0, 2^b - 1]`, see `grids`.
    `quant_prob` < 1 makes each element take the quantized value with that probability (QDrop; the engine
    sets it during reconstruction only). While `observing` it records samples of its inputs (`observe.observing`).
    """

    def __init__(self, bits: int, grid: str = "uniform") -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bit-width")
        self.grid = check_grid(grid)
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.enabled = False
        self.quant_prob = 1.0
        self.consumers: list[str] = []  # paths of the quantized layers reading this tensor (set by prepare)
        self.observing = False
        self._observed: list[torch.Tensor] = []

    @property
    def bounds(self) -> tuple[int, int]:
        return act_bounds(self.bits, bool(self.signed))

    def init_from(self, x: torch.Tensor, p: float = ACT_P) -> None:
        self.signed.fill_(signed_for(x))
        self.scale.data = act_step(x, self.bits, bool(self.signed), self.grid, p).to(self.scale)
        self.initialized.fill_(True)

    def start_observing(self) -> None:
        self._observed, self.observing = [], True

    def stop_observing(self) -> torch.Tensor | None:
        """Stop observing; the concatenated sample of what was seen (None if nothing)."""
        sample = torch.cat(self._observed) if self._observed else None
        self._observed, self.observing = [], False
        return sample

    def finish_observing(self) -> None:
        sample = self.stop_observing()
        if sample is not None:
            self.init_from(sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observed.append(subsample(x))
            return x
        if not self.enabled:
            return x
        return act_fake_quant(x, self.scale, self.bits, host_bool(self, "signed"), self.grid, self.quant_prob)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}, grid={self.grid}"
