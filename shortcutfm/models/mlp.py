"""A residual MLP velocity network for vectors (and small images, flattened)."""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import LabelEmbedding, SigmaEmbedding, condition_vector


class ResidualBlock(nn.Module):
    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class VelocityMLP(nn.Module):
    """``v = model(x, sigma, y=None)`` for x of any shape (B, *sample_shape); flattened internally.

    Args:
        sample_shape: shape of one sample, e.g. (2,) or (1, 8, 8).
        width: hidden width; depth: number of residual blocks (each FiLM-conditioned on sigma and label).
        num_classes: 0 for unconditional; else labels ``y`` in [0, num_classes], ``num_classes`` = null label.
    """

    def __init__(
        self, sample_shape: tuple[int, ...], width: int = 256, depth: int = 4, num_classes: int = 0, cond_dim: int = 128
    ):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        dim = int(torch.Size(self.sample_shape).numel())
        self.sigma_embed = SigmaEmbedding(cond_dim)
        self.label_embed = LabelEmbedding(num_classes, cond_dim) if num_classes else None
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, cond_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cond = condition_vector(self.sigma_embed, self.label_embed, sigma, y)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.out_norm(h)).view_as(x)
