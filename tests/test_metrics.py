"""Sample-quality metrics against exact answers: closed forms, naive O(n^2) sums, translations, torchmetrics."""

import math

import pytest
import scipy.linalg
import torch

from shortcutfm.evaluation.metrics import (
    energy_distance,
    frechet_distance,
    frechet_gaussians,
    gaussian_fit,
    random_directions,
    sliced_wasserstein2,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_energy(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    n, m = len(x), len(y)
    dxx = (x[:, None] - x[None]).norm(dim=-1)
    dyy = (y[:, None] - y[None]).norm(dim=-1)
    dxy = (x[:, None] - y[None]).norm(dim=-1)
    return float(2 * dxy.mean() - dxx.sum() / (n * (n - 1)) - dyy.sum() / (m * (m - 1)))


# ---------------------------------------------------------------- energy distance


@pytest.mark.parametrize("block_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [7, 16, 1024])
def test_energy_matches_naive_sum(chunk, block_dtype):
    x = torch.randn(50, 3, generator=gen(0))
    y = 0.7 * torch.randn(37, 3, generator=gen(1)) + 0.3
    expected = naive_energy(x, y)
    got = energy_distance(x, y, chunk=chunk, block_dtype=block_dtype)
    tol = 1e-12 if block_dtype == torch.float64 else 1e-6
    assert got == pytest.approx(expected, abs=tol)


def test_energy_flattens_images():
    x = torch.randn(20, 1, 2, 2, generator=gen(2))
    y = torch.randn(30, 1, 2, 2, generator=gen(3))
    assert energy_distance(x, y, chunk=8) == pytest.approx(naive_energy(x, y), abs=1e-6)


def test_energy_closed_form_point_masses_1d():
    # x = {0, 0, 1, 1}: E|X - X'| over i != j = 8 / 12; y = {3, 3, 3}: 0; E|X - Y| = (3 + 3 + 2 + 2) / 4.
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    y = torch.full((3, 1), 3.0)
    exact = dict(chunk=3, block_dtype=torch.float64)
    assert energy_distance(x, y, **exact) == pytest.approx(2 * 2.5 - 8 / 12 - 0.0, abs=1e-12)
    assert energy_distance(x, y, chunk=3) == pytest.approx(2 * 2.5 - 8 / 12 - 0.0, abs=1e-6)  # float32 blocks
    # Two point masses: 2 |a - b|.
    assert energy_distance(torch.zeros(5, 1), torch.full((4, 1), 2.0), **exact) == pytest.approx(4.0, abs=1e-12)


def test_energy_same_distribution_near_zero_and_shift_monotone():
    x = torch.randn(3000, 2, generator=gen(4))
    same = energy_distance(x, torch.randn(3000, 2, generator=gen(5)))
    assert abs(same) < 3e-3
    base = torch.randn(3000, 2, generator=gen(6))
    values = [energy_distance(x, base + torch.tensor([shift, 0.0])) for shift in (0.25, 0.5, 1.0, 2.0)]
    assert values[0] > 5 * abs(same)
    assert all(a < b for a, b in zip(values, values[1:]))


def test_energy_rejects_bad_input():
    with pytest.raises(ValueError, match="same sample size"):
        energy_distance(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="N >= 2"):
        energy_distance(torch.zeros(1, 2), torch.zeros(4, 2))


# ---------------------------------------------------------------- sliced Wasserstein


def test_sliced_w2_translation_is_exact():
    x = torch.randn(500, 3, generator=gen(7), dtype=torch.float64)
    shift = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    got = sliced_wasserstein2(x, x + shift, num_projections=100, generator=gen(8))
    directions = random_directions(100, 3, gen(8))
    assert got == pytest.approx(math.sqrt(float((directions @ shift).square().mean())), rel=1e-9)
    # Many directions: E (theta . t)^2 = |t|^2 / D.
    many = sliced_wasserstein2(x, x + shift, num_projections=4000, generator=gen(9))
    assert many == pytest.approx(float(shift.norm()) / math.sqrt(3), rel=0.03)


def test_sliced_w2_unequal_sizes_exact():
    x = torch.randn(100, 2, generator=gen(10))
    assert sliced_wasserstein2(x, torch.cat([x, x])) == pytest.approx(0.0, abs=1e-6)
    # 1-D: {0, 1} vs {0, 0.5, 1}: W2^2 = (1/6) 0.25 + (1/6) 0.25 = 1/12 (the only direction is +-1).
    got = sliced_wasserstein2(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]]), num_projections=3)
    assert got == pytest.approx(math.sqrt(1 / 12), rel=1e-9)


def test_sliced_w2_deterministic_by_default_and_batched():
    x = torch.randn(300, 4, generator=gen(11))
    y = torch.randn(200, 4, generator=gen(12)) + 0.5
    a = sliced_wasserstein2(x, y, num_projections=50)
    assert a == sliced_wasserstein2(x, y, num_projections=50)
    assert a == pytest.approx(sliced_wasserstein2(x, y, num_projections=50, batch_projections=7), rel=1e-12)


# ---------------------------------------------------------------- Frechet distance


def random_spd(dim: int, seed: int) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=gen(seed), dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_gaussians_closed_form():
    # Diagonal covariances commute: tr(Sa + Sb - 2 sqrt(Sa Sb)) = sum (sqrt a - sqrt b)^2.
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    ma, mb = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = float((ma - mb).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_gaussians(ma, torch.diag(a), mb, torch.diag(b)) == pytest.approx(expected, rel=1e-12)
    # General covariances: against scipy's matrix square root.
    sa, sb = random_spd(6, 13), random_spd(6, 14)
    mean_a, mean_b = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    trace_sqrt = scipy.linalg.sqrtm((sa @ sb).numpy()).real.trace()
    expected = 6.0 + float(sa.trace() + sb.trace()) - 2 * trace_sqrt
    assert frechet_gaussians(mean_a, sa, mean_b, sb) == pytest.approx(expected, rel=1e-9)
    assert frechet_gaussians(mean_a, sa, mean_a, sa) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_gaussian_samples():
    dim, n = 4, 200_000
    sa, sb = random_spd(dim, 15), random_spd(dim, 16)
    mean_a = torch.zeros(dim, dtype=torch.float64)
    mean_b = torch.tensor([0.5, -0.5, 0.0, 1.0], dtype=torch.float64)
    za = torch.randn(n, dim, generator=gen(17), dtype=torch.float64)
    zb = torch.randn(n, dim, generator=gen(18), dtype=torch.float64)
    fa = mean_a + za @ torch.linalg.cholesky(sa).T
    fb = mean_b + zb @ torch.linalg.cholesky(sb).T
    expected = frechet_gaussians(mean_a, sa, mean_b, sb)
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=0.02)
    mean, cov = gaussian_fit(fa)
    assert torch.allclose(cov, sa, atol=0.02)


def test_frechet_distance_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    fa = torch.randn(500, 8, generator=gen(19))
    fb = 1.3 * torch.randn(400, 8, generator=gen(20)) + 0.2
    fid = FrechetInceptionDistance(feature=Identity())
    fid.update(fa, real=True)
    fid.update(fb, real=False)
    assert frechet_distance(fa, fb) == pytest.approx(float(fid.compute()), rel=1e-5)


def test_energy_reference_reuses_the_reference_term_and_matches_the_direct_estimate():
    from shortcutfm.evaluation.metrics import EnergyReference

    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(600, 2, generator=generator) + 5.0
    scorer = EnergyReference(reference, chunk=128, block_dtype=torch.float64)
    for shift in (0.0, 0.3):  # one scorer, several sample sets: each against the O(n^2) definition
        x = torch.randn(400, 2, generator=generator) + 5.0 + shift
        assert scorer(x) == pytest.approx(naive_energy(x, reference), abs=1e-12)
    assert scorer(x) > 10 * abs(scorer(torch.randn(1000, 2, generator=generator) + 5.0))
