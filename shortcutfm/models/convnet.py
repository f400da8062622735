"""A small U-Net-style convolutional velocity network for small images with class conditioning."""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import LabelEmbedding, SigmaEmbedding, condition_vector


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ConvBlock(nn.Module):
    """Residual block: GN-SiLU-conv, FiLM from the conditioning vector, GN-SiLU-conv."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * out_channels)
        self.norm2, self.conv2 = _norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.conv1(nn.functional.silu(self.norm1(h)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        out = self.norm2(out) * (1 + scale) + shift
        return self.skip(h) + self.conv2(nn.functional.silu(out))


class VelocityConvNet(nn.Module):
    """``v = model(x, sigma, y=None)`` for images x (B, C, H, W) with H and W divisible by 2.

    One resolution level down and up, ``blocks`` residual blocks per level, FiLM conditioning on sigma and label.
    """

    def __init__(self, sample_shape: tuple[int, ...], channels: int = 64, blocks: int = 2, num_classes: int = 0):
        super().__init__()
        if len(sample_shape) != 3 or sample_shape[1] % 2 or sample_shape[2] % 2:
            raise ValueError(f"model.kind=convnet needs images (C, H, W) with even H and W, got {sample_shape}")
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        in_channels = sample_shape[0]
        cond_dim = 4 * channels
        self.sigma_embed = SigmaEmbedding(cond_dim)
        self.label_embed = LabelEmbedding(num_classes, cond_dim) if num_classes else None
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList(ConvBlock(channels, channels, cond_dim) for _ in range(blocks))
        self.pool = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(ConvBlock(2 * channels, 2 * channels, cond_dim) for _ in range(blocks))
        self.upsample = nn.ConvTranspose2d(2 * channels, channels, 2, stride=2)
        self.up = nn.ModuleList(
            ConvBlock(2 * channels if i == 0 else channels, channels, cond_dim) for i in range(blocks)
        )
        self.out = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cond = condition_vector(self.sigma_embed, self.label_embed, sigma, y)
        h = self.inp(x)
        for block in self.down:
            h = block(h, cond)
        skip = h
        h = self.pool(h)
        for block in self.mid:
            h = block(h, cond)
        h = torch.cat([self.upsample(h), skip], dim=1)
        for block in self.up:
            h = block(h, cond)
        return self.out(h)
