"""Sigma grids and time shifts.

Convention (used everywhere in shortcutfm): ``sigma`` lies in [0, 1]; ``sigma = 1`` is pure noise and
``sigma = 0`` is data. The interpolant is ``x_sigma = (1 - sigma) * x0 + sigma * noise``. Grids run from
noise to data, so they are *decreasing*: ``grid[0]`` is (close to) 1 and ``grid[-1] == 0``.
"""

from __future__ import annotations

import math

import torch

#: The first grid point is clamped to this value, so no network is ever asked for sigma exactly 1.
FIRST_SIGMA = 1.0 - 1e-5

#: Flux's resolution-dependent shift: ``mu`` is linear in the number of latent tokens between these anchors.
DYNAMIC_SHIFT_BASE_TOKENS = 256
DYNAMIC_SHIFT_MAX_TOKENS = 4096
DYNAMIC_SHIFT_BASE_MU = 0.5
DYNAMIC_SHIFT_MAX_MU = 1.15


def shift_sigma(sigma: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """Fixed time shift ``S_s(sigma) = s * sigma / (1 + (s - 1) * sigma)``.

    ``shift`` may be a float or a tensor that broadcasts against ``sigma`` (one shift per sample).
    ``s = 1`` is the identity; ``s > 1`` spends more of the grid near the noise end.
    """
    shift = torch.as_tensor(shift, dtype=sigma.dtype, device=sigma.device)
    return shift * sigma / (1 + (shift - 1) * sigma)


def dynamic_shift_mu(num_tokens: int | float) -> float:
    """``mu`` of Flux's dynamic shift: 0.5 at 256 latent tokens, 1.15 at 4096, linear in between (and beyond)."""
    slope = (DYNAMIC_SHIFT_MAX_MU - DYNAMIC_SHIFT_BASE_MU) / (DYNAMIC_SHIFT_MAX_TOKENS - DYNAMIC_SHIFT_BASE_TOKENS)
    return DYNAMIC_SHIFT_BASE_MU + slope * (float(num_tokens) - DYNAMIC_SHIFT_BASE_TOKENS)


def dynamic_shift_sigma(sigma: torch.Tensor, mu: float | torch.Tensor) -> torch.Tensor:
    """Flux's dynamic shift ``exp(mu) / (exp(mu) + (1 / sigma - 1))``.

    It equals :func:`shift_sigma` with ``s = exp(mu)``; sigma = 0 maps to 0 (no division by zero).
    """
    return shift_sigma(sigma, torch.exp(torch.as_tensor(mu, dtype=sigma.dtype, device=sigma.device)))


def uniform_grid(num_steps: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``linspace(1, 0, num_steps + 1)`` without clamping or shift. Shape ``(num_steps + 1,)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype, device=device)


def clamp_first(grid: torch.Tensor) -> torch.Tensor:
    """Clamp the noise end (last dimension, index 0) of one or many grids to :data:`FIRST_SIGMA`."""
    return grid.clamp(max=FIRST_SIGMA)


def sigma_grid(
    num_steps: int,
    shift: float = 1.0,
    *,
    mu: float | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The sampling grid of ``num_steps`` Euler steps, shape ``(num_steps + 1,)``, decreasing from ~1 to 0.

    Args:
        num_steps: number of steps N; the grid has N + 1 points.
        shift: fixed shift ``s`` (1 = uniform). Ignored when ``mu`` is given.
        mu: if given, use Flux's dynamic shift with this ``mu`` (see :func:`dynamic_shift_mu`).
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    base = uniform_grid(num_steps, dtype=torch.float64, device=device)
    shifted = dynamic_shift_sigma(base, mu) if mu is not None else shift_sigma(base, shift)
    return clamp_first(shifted).to(dtype)


def grid_points(
    num_steps: torch.Tensor, index: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """Points ``index`` of per-sample shifted grids, vectorised.

    Args:
        num_steps: (B,) integer grid sizes N.
        index: (B, K) integer indices into each grid (0 = noise end, N = data end).
        shift: (B,) per-sample shift factors (use ``exp(mu)`` for a dynamic shift).
    Returns:
        (B, K) sigmas in float64, with the index-0 point clamped to :data:`FIRST_SIGMA`.
    """
    fraction = 1.0 - index.double() / num_steps.double().unsqueeze(-1)
    return clamp_first(shift_sigma(fraction, shift.double().unsqueeze(-1)))


def mu_for_tokens_shift(num_tokens: int) -> float:
    """Shift factor ``exp(mu)`` equivalent to Flux's dynamic shift at ``num_tokens`` latent tokens."""
    return math.exp(dynamic_shift_mu(num_tokens))
