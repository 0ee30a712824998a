"""Small transformer-style models written for the tests, in the styles users write them (not the project's own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaaug.models.vit import ViT


class PatchStem(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, 7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 16, dim)


class MHABlock(nn.Module):
    """Pre-norm block on `nn.MultiheadAttention` (batch_first), with layer scale as bare parameters."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma1 = nn.Parameter(torch.full((dim,), 0.5))
        self.gamma2 = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.gamma1 * self.attn(h, h, h, need_weights=False)[0]
        return x + self.gamma2 * self.mlp(self.norm2(x))


class MHANet(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.stem = PatchStem(dim)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.ModuleList(MHABlock(dim, 2) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


class SDPAAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


class FunctionalBlock(nn.Module):
    """LayerNorm written with `F.layer_norm` on bare parameters, SDPA attention, functional GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.attn = SDPAAttention(dim, 2)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, (x.shape[-1],), self.ln_w, self.ln_b)
        x = x + self.attn(h)
        return x + self.fc2(F.gelu(self.fc1(F.layer_norm(x, (x.shape[-1],), self.ln_w, self.ln_b))))


class SDPANet(nn.Module):
    """Class token, SDPA, functional LayerNorm; returns a dict with logits."""

    def __init__(self, dim: int = 32, depth: int = 2, output: str = "dict") -> None:
        super().__init__()
        self.output = output
        self.stem = PatchStem(dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*(FunctionalBlock(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor):
        x = self.stem(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        x = self.blocks(x)
        logits = self.head(x[:, 0])
        if self.output == "dict":
            return {"features": x, "logits": logits}
        if self.output == "tuple":
            return logits, x
        if self.output == "string":
            return "logits"
        return logits


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, channels-last LayerNorm, inverted MLP, layer scale (Liu et al. 2022)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.act = nn.GELU()
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.pw2(self.act(self.pw1(h))) * self.scale
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 4, 4)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def small_vit() -> ViT:
    return ViT(dim=32, depth=2, heads=2)


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    return ViTForImageClassification(cfg).eval()


def hf_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=1, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, patch_size=2, num_labels=10)
    return ConvNextForImageClassification(cfg).eval()


def hf_deit():
    from transformers import DeiTConfig, DeiTForImageClassification

    cfg = DeiTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=10)
    return DeiTForImageClassification(cfg).eval()


MODELS = {"vit": small_vit, "mha": MHANet, "sdpa": SDPANet, "convnext": ConvNeXtNet}
