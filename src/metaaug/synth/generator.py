"""Class-conditional generator G(z, y) for FDDA: latent -> 1/4-size feature map -> two x2 upsamples -> image."""

from __future__ import annotations

import torch
from torch import nn

from metaaug.errors import ConfigError


class Generator(nn.Module):
    """Small conv generator (GDFQ/FDDA style) whose tanh output is scaled to the models' normalised input range.

    The label enters by multiplying the latent with a learned class embedding, so one network covers all classes.
    """

    def __init__(self, num_classes: int, latent_dim: int = 100, channels: int = 64,
                 image_shape: tuple[int, int, int] = (1, 28, 28), value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        c_out, h, w = image_shape
        if h < 4 or w < 4:
            raise ConfigError(f"generator image size must be at least 4x4, got {h}x{w}")
        if not value_range[0] < value_range[1]:
            raise ConfigError(f"generator value range must be (low, high) with low < high, got {value_range}")
        self.size = (h, w)  # generated at the next multiple of 4, then cropped
        self.latent_dim, self.base = latent_dim, (2 * channels, -(-h // 4), -(-w // 4))
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, 2 * channels * self.base[1] * self.base[2])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * channels),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, c_out, 3, padding=1),
            nn.Tanh(),
        )
        self.register_buffer("low", torch.tensor(float(value_range[0])))
        self.register_buffer("high", torch.tensor(float(value_range[1])))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(z * self.embed(y)).view(z.shape[0], *self.base)
        x = self.body(h)[..., : self.size[0], : self.size[1]]
        return self.low + (x + 1) * 0.5 * (self.high - self.low)
