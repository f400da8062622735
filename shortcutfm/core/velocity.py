"""The one velocity-model contract of shortcutfm.

A velocity model is any callable ``v = model(x, sigma, **cond)``:

* ``x``: (B, ...) a batch of states on the interpolant ``x_sigma = (1 - sigma) * x0 + sigma * noise``;
* ``sigma``: (B,) float, 1 = noise, 0 = data (never multiplied by 1000 inside the library);
* ``cond``: keyword tensors whose first dimension is the batch (class labels, text embeddings, guidance);
* returns ``v``: same shape as ``x``, the velocity ``d x_sigma / d sigma`` (``noise - x0`` for straight paths).

Guidance, latent packing and LoRA scales are wrappers around this contract, never flags of a solver.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import torch


class VelocityModel(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor: ...


def batch_sigma(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) sigma to a (B,) tensor in ``x``'s dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def expand_like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape (B,) values to (B, 1, ..., 1) so that they broadcast against ``x``."""
    return values.reshape(values.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


def select_rows(cond: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Take the rows ``rows`` (bool mask or index tensor) of every per-sample conditioning tensor."""
    return {name: value[rows] for name, value in cond.items()}


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_sigma = (1 - sigma) * x0 + sigma * noise`` for (B,) sigmas."""
    s = expand_like(sigma, x0)
    return (1 - s) * x0 + s * noise
