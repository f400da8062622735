"""Stateless samplers on any sigma grid: ``sample(model, noise, grid, **cond)``.

Grids are decreasing from (close to) 1 to 0; see :mod:`shortcutfm.core.grids`. Both samplers count network
function evaluations (NFE) so that step sweeps compare methods at equal cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .velocity import VelocityModel, batch_sigma


@dataclass
class SampleResult:
    x: torch.Tensor  # (B, ...) the final state (sigma = grid[-1], normally data)
    nfe: int  # number of velocity evaluations used


def _check_grid(grid: torch.Tensor) -> torch.Tensor:
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if grid.numel() < 2:
        raise ValueError("a sampling grid needs at least two points")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("a sampling grid must be strictly decreasing (from noise, sigma~1, to data, sigma=0)")
    return grid


@torch.no_grad()
def euler_sample(model: VelocityModel, noise: torch.Tensor, grid: torch.Tensor, **cond) -> SampleResult:
    """Euler: ``x <- x + (sigma_next - sigma) * v(x, sigma)``; one evaluation per step."""
    grid = _check_grid(grid)
    x = noise
    for sigma, sigma_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        v = model(x, batch_sigma(sigma, x), **cond)
        x = x + (sigma_next - sigma) * v.to(x.dtype)
    return SampleResult(x=x, nfe=grid.numel() - 1)


@torch.no_grad()
def heun_sample(model: VelocityModel, noise: torch.Tensor, grid: torch.Tensor, **cond) -> SampleResult:
    """Heun's second-order method; the step into sigma = 0 is a plain Euler step (as in EDM/diffusers).

    NFE is ``2 * steps - 1`` when the grid ends at 0, else ``2 * steps``.
    """
    grid = _check_grid(grid)
    x = noise
    nfe = 0
    for sigma, sigma_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        v = model(x, batch_sigma(sigma, x), **cond).to(x.dtype)
        nfe += 1
        x_euler = x + (sigma_next - sigma) * v
        if sigma_next == 0.0:
            x = x_euler
            continue
        v_next = model(x_euler, batch_sigma(sigma_next, x), **cond).to(x.dtype)
        nfe += 1
        x = x + (sigma_next - sigma) * 0.5 * (v + v_next)
    return SampleResult(x=x, nfe=nfe)


@torch.no_grad()
def midpoint_sample(model: VelocityModel, noise: torch.Tensor, grid: torch.Tensor, **cond) -> SampleResult:
    """The explicit midpoint method (second order): the velocity at the half-step point drives the whole step.
    Two evaluations per step."""
    grid = _check_grid(grid)
    x = noise
    for sigma, sigma_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        half = (sigma + sigma_next) / 2
        v = model(x, batch_sigma(sigma, x), **cond).to(x.dtype)
        v_half = model(x + (half - sigma) * v, batch_sigma(half, x), **cond).to(x.dtype)
        x = x + (sigma_next - sigma) * v_half
    return SampleResult(x=x, nfe=2 * (grid.numel() - 1))


SAMPLERS = {"euler": euler_sample, "heun": heun_sample, "midpoint": midpoint_sample}


def sample(model: VelocityModel, noise: torch.Tensor, grid: torch.Tensor, method: str = "euler", **cond) -> SampleResult:
    """Sample with ``method`` ("euler", "heun" or "midpoint") along ``grid``."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[method](model, noise, grid, **cond)
