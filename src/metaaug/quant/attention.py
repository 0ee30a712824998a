"""Attention written as explicit matmuls, so that QK^T and attn.V become quantized matmuls after capture.

`nn.MultiheadAttention` is a leaf to torch.fx and one fused kernel to torch.export, and
`F.scaled_dot_product_attention` is one fused op: either would leave both activation-activation matmuls and the
softmax in float. `decompose_attention` swaps each `nn.MultiheadAttention` for `DecomposedMHA` (the same weights as
separate q/k/v Linear layers, the same outputs), and `sdpa_math` is the textbook formula the capture uses for SDPA.
"""

from __future__ import annotations

import torch
from torch import nn


def sdpa_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """`softmax(Q K^T * scale + mask) V`, what `F.scaled_dot_product_attention` computes in eval mode (no dropout)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = masked_scores(scores, attn_mask, None, True)
    return scores.softmax(dim=-1) @ value


class DecomposedMHA(nn.Module):
    """`nn.MultiheadAttention` (eval mode) as q/k/v Linear layers, explicit matmuls and an output projection.

    Same call signature and outputs `(attn_output, attn_weights or None)` for batched inputs; dropout is not applied
    (quantization works on the eval-mode model). Attention biases `bias_k`/`bias_v` and `add_zero_attn` are refused
    at swap time.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        d, h = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.batch_first = d, h, mha.batch_first
        # read by nn.TransformerEncoder(Layer) to decide on its fused fast path (which the capture disables)
        self._qkv_same_embed_dim, self.in_proj_weight, self.in_proj_bias = mha._qkv_same_embed_dim, None, None
        self.head_dim = d // h
        like = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        self.q_proj = nn.Linear(d, d, bias=mha.in_proj_bias is not None, **like)
        self.k_proj = nn.Linear(mha.kdim, d, bias=mha.in_proj_bias is not None, **like)
        self.v_proj = nn.Linear(mha.vdim, d, bias=mha.in_proj_bias is not None, **like)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_weight.chunk(3), strict=True):
                    proj.weight.copy_(w)
            else:
                for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight),
                                   strict=True):
                    proj.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for proj, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3), strict=True):
                    proj.bias.copy_(b)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None, **like)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, Dh)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        if attn_mask is not None:
            scores = masked_scores(scores, attn_mask, self.num_heads, False)
        elif is_causal:
            keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if key_padding_mask is not None:
            scores = masked_scores(scores, key_padding_mask[:, None, None, :], self.num_heads, False)
        attn = scores.softmax(dim=-1)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=-3) if average_attn_weights else attn


def masked_scores(scores: torch.Tensor, mask: torch.Tensor, heads: int | None, keep_true: bool) -> torch.Tensor:
    """`scores` with a boolean mask (`keep_true`: True = attend, as SDPA; else True = masked out, as
    nn.MultiheadAttention) or an additive float mask applied. With `heads` (nn.MultiheadAttention) a (B*H, L, S)
    mask is viewed as (B, H, L, S); SDPA's mask broadcasts as it is. A leaf of the fx trace (its branches depend on
    the mask's dtype and rank)."""
    if heads is not None and mask.dim() == 3:
        mask = mask.reshape(-1, heads, *mask.shape[-2:])
    if mask.dtype != torch.bool:
        return scores + mask
    return scores.masked_fill(~mask if keep_true else mask, float("-inf"))


torch.fx.wrap("masked_scores")


def decompose_attention(model: nn.Module) -> None:
    """Swap every `nn.MultiheadAttention` in `model` for an equivalent `DecomposedMHA`, in place."""
    from metaaug.errors import ModelError

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        if mod.bias_k is not None or mod.add_zero_attn:
            raise ModelError(f"nn.MultiheadAttention at '{name}' uses bias_k/bias_v or add_zero_attn, which metaaug does not decompose")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, DecomposedMHA(mod))


