"""Uniform fake quantizers: per-channel weights with AdaRound soft rounding, per-tensor LSQ activations with QDrop."""

from __future__ import annotations

import math

import torch
from torch import nn

from metaaug.errors import ConfigError

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020)
ZETA, GAMMA = 1.1, -0.1
MIN_BITS, MAX_BITS = 2, 8
OBSERVE_VALUES = 262_144  # values kept per observed batch for the step-size search
# Lp norm of the clip-ratio searches (QDrop's setting uses 2.4 for both). Measured on the bundled ResNet-20 with
# round-to-nearest: activations at p=2.0 gave W2A4 44.8 / W2A2 45.7, at p=2.4 67.2 / 54.0 (p=3.0: 62.2 / 50.8).
WEIGHT_P, ACT_P = 2.4, 2.4


def check_bits(bits: int, what: str = "bit-width") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient. The forward is exactly `x.round()` (`x + (round(x) - x)` can be off by
    one ulp), so weights in round-to-nearest mode quantize bit-identically with or without the gradient path."""
    return x.round() + (x - x.detach())


def nearest_index(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """Round-to-nearest integer grid index `q - z` in [-z, levels - z], straight-through so `w` and `scale` get
    gradients (LSQ's step gradient for a learned scale). Shared by post-training and quantization-aware training."""
    return (round_ste(w / scale) + zero_point).clamp(0, levels) - zero_point


def keep_mask(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0/1 mask, 1 with probability p. For p = 0.5 on CPU it unpacks random bytes into bits: the CPU generator is
    serial, so drawing one byte per 8 elements is ~2x cheaper than `rand_like` on the reconstruction hot path."""
    n = math.prod(shape)
    if p == 0.5 and device.type == "cpu":
        raw = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8)
        bits = (raw.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        return bits.flatten()[:n].view(shape).to(dtype)
    return (torch.rand(shape, device=device) < p).to(dtype)


def qdrop_mix(quantized: torch.Tensor, fp: torch.Tensor, p: float) -> torch.Tensor:
    """QDrop: each element takes the quantized value with probability p, else the FP value (exact, no blending)."""
    if p >= 1.0:
        return quantized
    return torch.lerp(fp, quantized, keep_mask(quantized.shape, p, quantized.device, quantized.dtype))


class _LSQFakeQuant(torch.autograd.Function):
    """`clamp(round(x/s), lo, hi) * s`, optionally QDrop-mixed with x by a 0/1 mask, in one autograd node.

    Gradients are those of the round-then-clamp straight-through estimator (BRECQ/QDrop) with LSQ's step
    gradient (Esser et al. 2020), precomputed in the forward so the backward is one multiply and one dot product:
    ~4x faster than composing the ops, which matters because this runs twice per block per iteration.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
        xs = x / scale
        r = xs.round()
        rc = r.clamp(lo, hi)
        inside = (rc == r).to(x.dtype)
        q = rc * scale
        want_s = ctx.needs_input_grad[1]
        if mask is None:
            out, passthrough = q, inside
            dq = rc - xs * inside if want_s else None
        else:
            out = torch.lerp(x, q, mask)
            passthrough = 1 - mask * (1 - inside)
            dq = mask * (rc - xs * inside) if want_s else None
        ctx.save_for_backward(passthrough, dq)
        ctx.scale_shape = scale.shape
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        passthrough, dq = ctx.saved_tensors
        grad_s = None if dq is None else torch.dot(g.reshape(-1), dq.reshape(-1)).reshape(ctx.scale_shape)
        return g * passthrough, grad_s, None, None, None


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int, quant_prob: float = 1.0) -> torch.Tensor:
    mask = None if quant_prob >= 1.0 else keep_mask(x.shape, quant_prob, x.device, x.dtype)
    return _LSQFakeQuant.apply(x, scale, mask, lo, hi)


def lp_search_channel(w: torch.Tensor, bits: int, p: float = WEIGHT_P, grid: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric scale/zero-point minimising the Lp error over clip ratios 1.00 -> 0.01."""
    w2 = w.flatten(1)
    levels = 2**bits - 1
    wmin, wmax = w2.min(1).values.clamp(max=0), w2.max(1).values.clamp(min=0)
    best_err = torch.full_like(wmin, float("inf"))
    best_s, best_z = torch.ones_like(wmin), torch.zeros_like(wmin)
    for r in torch.linspace(1.0, 0.01, grid).tolist():
        lo, hi = wmin * r, wmax * r
        s = ((hi - lo) / levels).clamp(min=1e-8)
        z = (-lo / s).round()
        q = ((w2 / s[:, None]).round() + z[:, None]).clamp(0, levels)
        err = ((q - z[:, None]) * s[:, None] - w2).abs().pow(p).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def lp_search_tensor(x: torch.Tensor, lo: int, hi: int, p: float = ACT_P, grid: int = 100) -> torch.Tensor:
    """Per-tensor step size for the integer range [lo, hi] minimising the Lp error over clip ratios."""
    x = x.flatten().float()
    bound = x.abs().max().clamp(min=1e-8) if lo < 0 else x.max().clamp(min=1e-8)
    best_err, best_s = float("inf"), bound / hi
    for r in torch.linspace(1.0, 0.01, grid).tolist():
        s = bound * r / hi
        err = float(((x / s).round().clamp(lo, hi) * s - x).abs().pow(p).mean())
        if err < best_err:
            best_err, best_s = err, s
    return best_s.reshape(1)


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
        s, z = lp_search_channel(w.detach(), self.bits, p)
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

    Unsigned `[0, 2^b - 1]` when the calibration tensor is non-negative, else signed symmetric.
    `quant_prob` < 1 makes each element take the quantized value with that probability (QDrop; the engine
    sets it during reconstruction only).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bit-width")
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
        if bool(self.signed):
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def init_from(self, x: torch.Tensor, p: float = ACT_P) -> None:
        self.signed.fill_(bool(x.min() < 0))
        lo, hi = self.bounds
        self.scale.data = lp_search_tensor(x, lo, hi, p).to(self.scale)
        self.initialized.fill_(True)

    def finish_observing(self) -> None:
        if self._observed:
            self.init_from(torch.cat(self._observed))
        self._observed, self.observing = [], False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observed.append(x.detach().flatten()[:: max(1, x.numel() // OBSERVE_VALUES)])
            return x
        if not self.enabled:
            return x
        lo, hi = self.bounds
        return lsq_fake_quant(x, self.scale, lo, hi, self.quant_prob)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}"
