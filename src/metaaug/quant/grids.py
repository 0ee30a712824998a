"""Quantization grids: which values a quantized tensor may take, and the fake-quant functions that snap onto them.

Everything that quantizes (post-training quantizers, QAT banks, MetaQuantNet, the sensitivity baseline) goes through
these functions, so a grid's integer range and rounding exist once.

Weights: per-channel asymmetric uniform (`rtn_fake_quant`). Activations: per-tensor, on one of `ACT_GRIDS`:
- "uniform": `clamp(round(x/s), lo, hi) * s` with LSQ's step gradient (`lsq_fake_quant`);
- "log2": `s * 2^-q`, `q = clamp(round(-log2(x/s)), 0, 2^b - 1)`, values that would need a larger `q` quantized to 0
  (the post-softmax quantizer of FQ-ViT and RepQ-ViT; non-negative inputs only).
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
from collections.abc import Callable, Iterator

import torch

from metaaug.errors import ConfigError

ACT_GRIDS = ("uniform", "log2")


def check_grid(grid: str) -> str:
    if grid not in ACT_GRIDS:
        raise ConfigError(f"activation grid must be one of {', '.join(ACT_GRIDS)}, got {grid!r}")
    return grid


def act_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of an activation grid: signed symmetric `[-2^(b-1), 2^(b-1) - 1]`, else `[0, 2^b - 1]` (on the
    log2 grid, which is never signed, the range of the code `q`)."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def act_span(bits: int, signed: bool, grid: str) -> int:
    """How many steps the largest representable value is: `hi` on the uniform grid, 1 on the log2 grid (its top
    level is `s` at every width). A clipping range shared by several widths is divided by this."""
    return 1 if grid == "log2" else act_bounds(bits, signed)[1]


def signed_for(x: torch.Tensor) -> bool:
    """A tensor gets a signed grid when its calibration sample has negative values (ReLU outputs stay unsigned)."""
    return bool(x.min() < 0)


def host_bool(module: torch.nn.Module, name: str) -> bool:
    """`bool(module.<name>)` for a 0-dim bool buffer, read from the device only when the buffer changed: on a GPU
    each read is a host sync, and a quantizer's forward needs its `signed` flag at every step. An in-place write
    (`fill_`, `load_state_dict`) bumps the tensor's version and `.to()` makes a new tensor, so either re-reads."""
    t = getattr(module, name)
    key = (t.data_ptr(), t.device, t._version)
    cache = module.__dict__.setdefault("_host_bools", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, bool(t))
    return hit[1]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient. The forward is exactly `x.round()` (`x + (round(x) - x)` can be off by
    one ulp), so weights in round-to-nearest mode quantize bit-identically with or without the gradient path."""
    return x.round() + (x - x.detach())


def nearest_index(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """Round-to-nearest integer grid index `q - z` in [-z, levels - z], straight-through so `w` and `scale` get
    gradients (LSQ's step gradient for a learned scale). Shared by post-training and quantization-aware training."""
    return (round_ste(w / scale) + zero_point).clamp(0, levels) - zero_point


def rtn_fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest asymmetric weight fake-quant `((round(w/s) + z).clamp(0, 2^b - 1) - z) * s`, straight-through."""
    return nearest_index(w, scale, zero_point, 2**bits - 1) * scale


def keep_mask(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0/1 mask, 1 with probability p. For p = 0.5 on CPU it unpacks random bytes into bits: the CPU generator is
    serial, so drawing one byte per 8 elements is ~2x cheaper than `rand_like` on the reconstruction hot path. A byte
    is unpacked by looking up its 8 bits, packed as 8 bytes in one int64 (`_BYTE_BITS`): one 8-byte gather per 8
    elements instead of a shift and a mask over all of them. Bit j of byte i is element 8i + j. A bool `dtype` costs
    no conversion on any device (the fused fake-quant node converts inside)."""
    n = math.prod(shape)
    if p == 0.5 and device.type == "cpu":
        raw = torch.randint(0, 256, ((n + 7) // 8,), device=device)
        return _BYTE_BITS.index_select(0, raw).view(torch.bool)[:n].view(shape).to(dtype)
    return (torch.rand(shape, device=device) < p).to(dtype)


# entry b: the bits of byte b, least significant first, one 0/1 byte each, read as one int64 (any byte order: the
# table is built and read back through 1-byte views)
_BYTE_BITS = ((torch.arange(256, device="cpu").unsqueeze(1) >> torch.arange(8, device="cpu")) & 1).to(
    torch.uint8).view(torch.int64).view(-1)


def qdrop_mix(quantized: torch.Tensor, fp: torch.Tensor, p: float) -> torch.Tensor:
    """QDrop: each element takes the quantized value with probability p, else the FP value (exact, no blending)."""
    if p >= 1.0:
        return quantized
    return torch.lerp(fp, quantized, keep_mask(quantized.shape, p, quantized.device, quantized.dtype))


def uniform_levels(xs: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`clamp(round(x/s), lo, hi)`, whether `x/s` lies inside the range) for `xs = x/s`."""
    r = xs.round()
    rc = r.clamp(lo, hi)
    return rc, rc == r


def log2_levels(xs: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`2^-q` with `q = clamp(round(-log2(x/s)), lo, hi - 1)`, 0 where `round(-log2(x/s)) >= hi`; whether `x/s` lies
    inside the range, i.e. neither clipped to the top level `s` nor quantized to 0) for `xs = x/s`. The top code `hi`
    means zero, so b bits hold 2^b - 1 powers of two and zero (FQ-ViT's log2 quantizer)."""
    r = torch.where(xs > 0, -torch.log2(xs), math.inf).round()
    zero = r >= hi
    level = torch.where(zero, 0.0, torch.exp2(-r.clamp(lo, hi - 1)))
    return level, (r >= lo) & ~zero


_LEVELS: dict[str, Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "uniform": uniform_levels, "log2": log2_levels}


class _GridFakeQuant(torch.autograd.Function):
    """`level(x/s) * s` on a grid, optionally QDrop-mixed with x by a 0/1 mask, in one autograd node.

    The straight-through estimator treats the grid map `v -> level(v)` as the identity inside the range, so x gets
    gradient 1 there and 0 outside, and the step gets LSQ's gradient (Esser et al. 2020) `level(v) - v * inside`; on
    the uniform grid this is the round-then-clamp STE of BRECQ/QDrop. (On the log2 grid a straight-through round
    inside the logarithm would give the step no gradient at all inside the range: `s * 2^-(log2 s - log2 x) = x`.)
    Gradients are precomputed in the forward so the backward is one multiply and one dot product: ~4x faster than
    composing the ops, which matters because this runs twice per block per iteration.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None, grid: str, lo: int, hi: int) -> torch.Tensor:
        xs = x / scale
        rc, inside = _LEVELS[grid](xs, lo, hi)
        inside = inside.to(x.dtype)
        q = rc * scale
        want_s = ctx.needs_input_grad[1]
        if mask is None:
            out, passthrough = q, inside
            dq = rc - xs * inside if want_s else None
        else:
            mask = mask.to(x.dtype)  # drawn as bool: converted here, inside the compiled kernel when compiled
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
        return g * passthrough, grad_s, None, None, None, None


_grid_node: Callable[..., torch.Tensor] = _GridFakeQuant.apply


@contextlib.contextmanager
def compiled_fake_quant(enabled: bool = True) -> Iterator[None]:
    """Within: the fused fake-quant node runs through `torch.compile(dynamic=False)`, one kernel per shape instead of
    ~12 eager passes (outputs identical; the step gradient's sum order differs, ~1e-6 relative). The QDrop mask is
    still drawn eagerly, so the random stream is the same. Each new shape costs a compile (~1-10 s on a CPU)."""
    global _grid_node
    if not enabled:
        yield
        return
    previous = _grid_node
    _grid_node = _compiled_node()
    try:
        with torch._dynamo.config.patch(recompile_limit=256):
            yield
    finally:
        _grid_node = previous


CXX = ("g++", "clang++", "c++")


def check_compiler(device: torch.device) -> None:
    """torch.compile builds CPU kernels with a C++ compiler: without one on PATH, say so before the run starts
    (a CUDA device compiles with Triton and needs none)."""
    if device.type == "cpu" and not any(shutil.which(c) for c in CXX):
        raise ConfigError(f"compile_fake_quant on the CPU needs a C++ compiler for torch.compile ({', '.join(CXX)}); "
                          "none is on PATH: install one or leave compile_fake_quant off")


@functools.cache
def _compiled_node() -> Callable[..., torch.Tensor]:
    return torch.compile(_GridFakeQuant.apply, dynamic=False)


def _mask(x: torch.Tensor, quant_prob: float) -> torch.Tensor | None:
    return None if quant_prob >= 1.0 else keep_mask(x.shape, quant_prob, x.device, torch.bool)


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int, quant_prob: float = 1.0) -> torch.Tensor:
    """Uniform grid `clamp(round(x/s), lo, hi) * s`; with `quant_prob` < 1 QDrop-mixed with x."""
    return _grid_node(x, scale, _mask(x, quant_prob), "uniform", lo, hi)


def log2_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int, quant_prob: float = 1.0) -> torch.Tensor:
    """Log2 grid `s * 2^-q`, `q` in `[0, 2^b - 1]`, 0 below the last level; with `quant_prob` < 1 QDrop-mixed with x."""
    return _grid_node(x, scale, _mask(x, quant_prob), "log2", 0, 2**bits - 1)


def act_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool, grid: str, quant_prob: float = 1.0) -> torch.Tensor:
    """An activation fake-quantized on `grid` at `bits` (the one entry point of quantizers and banks), always in
    float32: under bf16 autocast (`compute_dtype`) a layer's bfloat16 output is quantized on the float32 grid."""
    x = x.float()
    if grid == "log2":
        return log2_fake_quant(x, scale, bits, quant_prob)
    lo, hi = act_bounds(bits, signed)
    return lsq_fake_quant(x, scale, lo, hi, quant_prob)
