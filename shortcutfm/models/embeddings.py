"""Embeddings shared by the built-in velocity networks."""

from __future__ import annotations

import math

import torch
from torch import nn


class SigmaEmbedding(nn.Module):
    """Sinusoidal features of sigma in [0, 1] (log-spaced frequencies 1..1000), then a two-layer MLP.

    The frequencies are an internal detail: the contract still passes sigma in [0, 1].
    """

    def __init__(self, dim: int, num_frequencies: int = 64):
        super().__init__()
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), num_frequencies))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        angles = sigma.float().unsqueeze(-1) * self.freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class LabelEmbedding(nn.Module):
    """Class embedding with one extra "null" row (index ``num_classes``) for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)


def condition_vector(
    sigma_embed: SigmaEmbedding, label_embed: LabelEmbedding | None, sigma: torch.Tensor, y: torch.Tensor | None
) -> torch.Tensor:
    """SiLU of the summed sigma and label embeddings; a missing ``y`` means the null label (unconditional)."""
    cond = sigma_embed(sigma)
    if label_embed is not None:
        if y is None:
            y = torch.full(sigma.shape, label_embed.num_classes, dtype=torch.long, device=sigma.device)
        cond = cond + label_embed(y)
    return nn.functional.silu(cond)
