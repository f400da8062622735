"""2D toy distributions, sampled with an explicit ``torch.Generator`` (no global RNG state).

Every sampler has the signature ``fn(n, generator) -> (n, 2) float32`` and returns points that are roughly
zero-mean with a per-coordinate standard deviation of about 1, so they are used in model space as they are
(no standardisation, see :mod:`shortcutfm.data.dataset`).

============  ==================================================================  ===========
name          what                                                                std (x, y)
============  ==================================================================  ===========
checkerboard  the common 4x4 checkerboard on [-2, 2]^2 (8 filled unit squares)     1.15, 1.15
8gaussians    8 Gaussians (std 0.1) evenly spaced on the circle of radius 2        1.42, 1.42
moons         two interleaved half circles (noise std 0.05), scaled by 1.5          1.3, 0.75
spirals       two interleaved spiral arms (noise std 0.1), each 1.5 turns          1.2, 1.15
rings         4 concentric circles of radii 0.5, 1, 1.5, 2 (noise std 0.05)         0.97, 0.97
============  ==================================================================  ===========
"""

from __future__ import annotations

import math
from typing import Callable

import torch

ToySampler = Callable[[int, torch.Generator], torch.Tensor]


def _check_n(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"n (number of toy samples) must be a positive integer, got {n!r}")


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform on the 8 "black" unit squares of a 4x4 board on [-2, 2]^2. Returns (n, 2) float32."""
    _check_n(n)
    x = 4.0 * _uniform(n, generator) - 2.0
    # y in [-2, -1) or [0, 1) first, then moved up one square where floor(x) is odd -> a checker pattern.
    row = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64)
    y = _uniform(n, generator) - 2.0 * row + torch.remainder(torch.floor(x), 2.0)
    return torch.stack([x, y], dim=1).float()


def eight_gaussians(n: int, generator: torch.Generator, radius: float = 2.0, std: float = 0.1) -> torch.Tensor:
    """Mixture of 8 equal Gaussians (isotropic ``std``) centred on the circle of ``radius``. Returns (n, 2)."""
    _check_n(n)
    which = torch.randint(0, 8, (n,), generator=generator, dtype=torch.float64)
    angle = which * (2.0 * math.pi / 8.0)
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return (centres + std * _normal((n, 2), generator)).float()


def moons(n: int, generator: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    """Two interleaved half circles (like ``sklearn.datasets.make_moons``), centred and scaled by 1.5.

    Returns (n, 2) float32; each point picks a moon with probability 1/2.
    """
    _check_n(n)
    angle = math.pi * _uniform(n, generator)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower = torch.stack([1.0 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    pick = torch.randint(0, 2, (n, 1), generator=generator).bool()
    points = torch.where(pick, upper, lower) + noise * _normal((n, 2), generator)
    centre = torch.tensor([0.5, 0.25], dtype=torch.float64)
    return (1.5 * (points - centre)).float()


def spirals(n: int, generator: torch.Generator, noise: float = 0.1, turns: float = 1.5) -> torch.Tensor:
    """Two interleaved spiral arms (the second is the first rotated by 180 degrees). Returns (n, 2) float32.

    The arm is ``r(t) = t`` at angle ``t`` for ``t = sqrt(u) * 2 pi turns`` (so points are spread evenly along
    the arm), divided by 4 to reach unit scale, plus Gaussian noise of std ``noise``.
    """
    _check_n(n)
    t = torch.sqrt(_uniform(n, generator)) * (2.0 * math.pi * turns)
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) / 4.0
    sign = 1.0 - 2.0 * torch.randint(0, 2, (n, 1), generator=generator, dtype=torch.float64)
    return (sign * arm + noise * _normal((n, 2), generator)).float()


def rings(n: int, generator: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    """4 concentric circles of radii 0.5, 1, 1.5 and 2, equally likely, uniform in angle. Returns (n, 2)."""
    _check_n(n)
    radius = 0.5 * (1.0 + torch.randint(0, 4, (n,), generator=generator, dtype=torch.float64))
    angle = 2.0 * math.pi * _uniform(n, generator)
    circle = radius.unsqueeze(1) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return (circle + noise * _normal((n, 2), generator)).float()


#: Registry of the toy samplers: name -> ``fn(n, generator) -> (n, 2) float32``.
TOY_DATASETS: dict[str, ToySampler] = {
    "checkerboard": checkerboard,
    "8gaussians": eight_gaussians,
    "moons": moons,
    "spirals": spirals,
    "rings": rings,
}
