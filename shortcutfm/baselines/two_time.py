"""A second time input for the built-in networks, added with a zero-initialised embedding.

Shortcut models (step size ``d``) and MeanFlow (interval ``t - r``) condition the network on a second scalar.
SCFM avoids this architecture change; the bench's ``shortcut`` and ``meanflow`` baselines make it here: the
wrapped network's sigma embedding becomes ``sigma_embed(sigma) + extra(second)``, where ``extra`` is a fresh
sinusoidal embedding whose last layer starts at zero, so the wrapped network equals the teacher at
initialisation for every value of the second input.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.grids import sigma_grid
from ..core.velocity import batch_sigma
from ..models.embeddings import SigmaEmbedding

__all__ = ["TwoTimeNetwork", "interval_euler_sample"]


class _SummedEmbedding(nn.Module):
    def __init__(self, original: nn.Module, extra: nn.Module, owner: "TwoTimeNetwork"):
        super().__init__()
        self.original, self.extra = original, extra
        self._owner = [owner]  # a list: not registered as a submodule (no cycle)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        second = self._owner[0].second
        if second is None:
            raise RuntimeError("TwoTimeNetwork: call the wrapper with its second time input, not the inner network")
        return self.original(sigma) + self.extra(second)


class TwoTimeNetwork(nn.Module):
    """``v = net(x, sigma, second, **cond)`` around a built-in network with a ``sigma_embed`` module."""

    def __init__(self, network: nn.Module):
        super().__init__()
        if not isinstance(getattr(network, "sigma_embed", None), SigmaEmbedding):
            raise ValueError("TwoTimeNetwork needs a built-in network (VelocityMLP or VelocityConvNet)")
        original = network.sigma_embed
        dim = original.mlp[-1].out_features
        extra = SigmaEmbedding(dim)
        nn.init.zeros_(extra.mlp[-1].weight)
        nn.init.zeros_(extra.mlp[-1].bias)
        self.second: torch.Tensor | None = None
        network.sigma_embed = _SummedEmbedding(original, extra, self)
        self.network = network

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, second: torch.Tensor, **cond) -> torch.Tensor:
        self.second = second
        try:
            return self.network(x, sigma, **cond)
        finally:
            self.second = None


@torch.no_grad()
def interval_euler_sample(network: TwoTimeNetwork, noise: torch.Tensor, num_steps: int, cond) -> torch.Tensor:
    """``num_steps`` uniform Euler steps of a two-time network whose second input is the step's length (the
    shortcut model's ``d``, MeanFlow's ``t - r``): ``x <- x + (t' - t) net(x, t, t - t')``."""
    grid = sigma_grid(num_steps, 1.0, dtype=noise.dtype).tolist()
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * network(x, batch_sigma(t, x), batch_sigma(t - t_next, x), **cond)
    return x
