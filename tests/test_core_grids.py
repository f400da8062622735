"""Sigma grids and time shifts against their closed forms (docs/method.md, "Conventions")."""

import math

import pytest
import torch

import shortcutfm.core as core
from shortcutfm.core.grids import (
    FIRST_SIGMA,
    clamp_first,
    dynamic_shift_mu,
    dynamic_shift_sigma,
    grid_points,
    mu_for_tokens_shift,
    shift_sigma,
    sigma_grid,
    uniform_grid,
)


def test_public_api_imports():
    for name in core.__all__:
        assert hasattr(core, name), name


@pytest.mark.parametrize("n", [1, 2, 3, 8, 32])
def test_uniform_grid_values(n):
    grid = uniform_grid(n, dtype=torch.float64)
    expected = torch.tensor([1 - k / n for k in range(n + 1)], dtype=torch.float64)
    assert grid.shape == (n + 1,)
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0, 4.5])
def test_shift_formula(s):
    sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
    expected = torch.tensor([s * t / (1 + (s - 1) * t) for t in sigma.tolist()], dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(sigma, s), expected, rtol=0, atol=1e-15)


def test_shift_one_is_identity():
    sigma = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shift_sigma(sigma, 1.0), sigma, rtol=0, atol=0)


@pytest.mark.parametrize("s", [0.3, 1.0, 2.5, 4.5, 20.0])
def test_shift_fixes_ends_and_is_monotone(s):
    sigma = torch.linspace(0, 1, 1001, dtype=torch.float64)
    shifted = shift_sigma(sigma, s)
    assert shifted[0].item() == 0.0
    assert shifted[-1].item() == pytest.approx(1.0, abs=1e-15)
    assert bool((shifted[1:] > shifted[:-1]).all())
    if s > 1:  # a shift > 1 spends more of the grid near noise: every interior point moves up
        assert bool((shifted[1:-1] > sigma[1:-1]).all())


def test_shift_per_sample_tensor():
    sigma = torch.full((3,), 0.5, dtype=torch.float64)
    shifts = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(sigma, shifts), torch.tensor([0.5, 0.75, 1 / 3], dtype=torch.float64))


def test_dynamic_shift_mu_anchors():
    assert dynamic_shift_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert dynamic_shift_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert dynamic_shift_mu(2176) == pytest.approx(0.825, abs=1e-12)  # linear: the midpoint
    assert mu_for_tokens_shift(4096) == pytest.approx(math.exp(1.15), rel=1e-12)


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.15])
def test_dynamic_shift_is_shift_with_exp_mu(mu):
    sigma = torch.linspace(0, 1, 257, dtype=torch.float64)
    # Flux's form exp(mu) / (exp(mu) + (1/sigma - 1)), written out independently (sigma > 0)
    inner = sigma[1:]
    flux = math.exp(mu) / (math.exp(mu) + (1 / inner - 1))
    got = dynamic_shift_sigma(sigma, mu)
    assert got[0].item() == 0.0
    torch.testing.assert_close(got[1:], flux, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got, shift_sigma(sigma, math.exp(mu)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n, s", [(1, 1.0), (4, 1.0), (4, 3.0), (32, 4.5), (1000, 4.5)])
def test_sigma_grid_clamps_first_point_only(n, s):
    grid = sigma_grid(n, s, dtype=torch.float64)
    fractions = [1 - k / n for k in range(n + 1)]
    expected = torch.tensor([s * t / (1 + (s - 1) * t) for t in fractions], dtype=torch.float64)
    assert grid.shape == (n + 1,)
    assert grid[0].item() == pytest.approx(1 - 1e-5, abs=1e-15)
    assert grid[-1].item() == 0.0
    torch.testing.assert_close(grid[1:], expected[1:], rtol=0, atol=1e-14)
    assert bool((grid[1:] < grid[:-1]).all())


def test_sigma_grid_dynamic_mu_and_dtype():
    grid = sigma_grid(8, mu=1.15, dtype=torch.float64)
    base = 1 - torch.arange(9, dtype=torch.float64) / 8
    expected = clamp_first(shift_sigma(base, math.exp(1.15)))
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-15)
    assert sigma_grid(8, 3.0).dtype == torch.float32
    assert sigma_grid(8, 3.0)[0].item() == pytest.approx(FIRST_SIGMA, abs=1e-7)


def test_grid_points_match_sigma_grid_per_row():
    gen = torch.Generator().manual_seed(1)
    num_steps = torch.tensor([2, 4, 8, 16, 32, 32, 3])
    shift = torch.tensor([1.0, 3.0, 2.5, 4.5, 1.0, 3.7, 0.6], dtype=torch.float64)
    index = torch.stack([torch.randint(0, int(n) + 1, (5,), generator=gen) for n in num_steps])
    index[:, 0] = 0  # include the clamped noise end in every row
    points = grid_points(num_steps, index, shift)
    assert points.dtype == torch.float64 and points.shape == (7, 5)
    for row in range(7):
        grid = sigma_grid(int(num_steps[row]), float(shift[row]), dtype=torch.float64)
        torch.testing.assert_close(points[row], grid[index[row]], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: uniform_grid(0), "num_steps"),
        (lambda: sigma_grid(0), "num_steps"),
        (lambda: sigma_grid(-3, 2.0), "num_steps"),
        (lambda: sigma_grid(4, 0.0), "shift"),
        (lambda: sigma_grid(4, -1.0), "shift"),
    ],
)
def test_bad_grid_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()
