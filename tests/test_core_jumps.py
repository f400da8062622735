"""Jump sampling: statistics over a large batch with a fixed generator, exact grids, config validation."""

import math

import pytest
import torch

from shortcutfm.core.grids import FIRST_SIGMA, dynamic_shift_mu, sigma_grid
from shortcutfm.core.jumps import FLOW, SELF, TEACHER, JumpSampling, sample_jumps

BIG = 100_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_binomial(count, n, p, z=5.0):
    """``count`` successes out of ``n`` trials is within ``z`` standard deviations of ``n p``."""
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= z * sd + 1e-9, f"{count} / {n}, expected p = {p}"


def _expected_sigmas(num_steps, start, shift, t_skip):
    """Grid points start..start+t_skip of each row, written out from docs/method.md's formula (float64)."""
    index = start.double().unsqueeze(1) + torch.arange(t_skip + 1, dtype=torch.float64)
    t = 1 - index / num_steps.double().unsqueeze(1)
    s = shift.unsqueeze(1)
    out = s * t / (1 + (s - 1) * t)
    return torch.where(index == 0, torch.full_like(out, 1 - 1e-5), out)


@pytest.fixture(scope="module")
def default_batch():
    spec = JumpSampling(flow_fraction=0.25)
    return spec, sample_jumps(BIG, spec, _gen(0))


def test_teacher_fraction_among_shortcut_rows(default_batch):
    spec, jumps = default_batch
    shortcut = jumps.mode != FLOW
    assert int(shortcut.sum()) == BIG - round(0.25 * BIG)
    assert set(jumps.mode.unique().tolist()) == {FLOW, TEACHER, SELF}
    _assert_binomial(int((jumps.mode == TEACHER).sum()), int(shortcut.sum()), spec.teacher_prob)


def test_grid_sizes_by_mode(default_batch):
    spec, jumps = default_batch
    teacher, self_rows = jumps.mode == TEACHER, jumps.mode == SELF
    assert bool((jumps.num_steps[teacher] == spec.teacher_grid).all())
    sizes = jumps.num_steps[self_rows]
    n_self = int(self_rows.sum())
    for n in spec.self_grids:
        _assert_binomial(int((sizes == n).sum()), n_self, 1 / len(spec.self_grids))
    assert int(sum((sizes == n).sum() for n in spec.self_grids)) == n_self


def test_start_indices_even_in_range_and_all_used(default_batch):
    spec, jumps = default_batch
    rows = jumps.mode != FLOW
    start, n = jumps.start[rows], jumps.num_steps[rows]
    assert bool((start % 2 == 0).all())
    assert bool((start >= 0).all()) and bool((start <= n - spec.t_skip).all())
    for size in (*spec.self_grids, spec.teacher_grid):
        used = set(start[n == size].tolist())
        assert used == set(range(0, size - spec.t_skip + 1, 2)), size
    # uniform over the starts of the 16-step grid (8 starts)
    starts16 = start[n == 16]
    for value in range(0, 15, 2):
        _assert_binomial(int((starts16 == value).sum()), starts16.numel(), 1 / 8)


def test_sigmas_are_the_shifted_grid_points(default_batch):
    spec, jumps = default_batch
    rows = jumps.mode != FLOW
    sigmas = jumps.sigmas[rows]
    assert jumps.sigmas.dtype == torch.float64 and jumps.sigmas.shape == (BIG, spec.t_skip + 1)
    expected = _expected_sigmas(jumps.num_steps[rows], jumps.start[rows], jumps.shift[rows], spec.t_skip)
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-14)
    # consecutive differences are the shifted grid's cell widths, all positive
    torch.testing.assert_close(sigmas[:, :-1] - sigmas[:, 1:], expected[:, :-1] - expected[:, 1:], rtol=0, atol=1e-14)
    assert bool((sigmas[:, :-1] > sigmas[:, 1:]).all())
    torch.testing.assert_close(jumps.sigma, jumps.sigmas[:, 0], rtol=0, atol=0)
    # a few rows against sigma_grid itself
    for i in torch.nonzero(rows)[:50, 0].tolist():
        grid = sigma_grid(int(jumps.num_steps[i]), float(jumps.shift[i]), dtype=torch.float64)
        s = int(jumps.start[i])
        torch.testing.assert_close(jumps.sigmas[i], grid[s : s + spec.t_skip + 1], rtol=0, atol=1e-14)


def test_shift_distribution(default_batch):
    spec, jumps = default_batch
    shift = jumps.shift
    alt = shift == spec.alt_shift
    _assert_binomial(int(alt.sum()), BIG, spec.alt_shift_prob)
    main = shift[~alt]
    low, high = spec.shift_range
    assert bool((main >= low).all()) and bool((main <= high).all())
    # uniform: each quarter of the range gets a quarter of the rows
    for q in range(4):
        inside = (main >= low + q * (high - low) / 4) & (main < low + (q + 1) * (high - low) / 4)
        _assert_binomial(int(inside.sum()), main.numel(), 0.25)


def test_dynamic_alt_shift_uses_num_tokens():
    spec = JumpSampling(alt_shift="dynamic", alt_shift_prob=0.3)
    jumps = sample_jumps(20_000, spec, _gen(1), num_tokens=1024)
    expected = math.exp(dynamic_shift_mu(1024))  # about 1.88: outside the [2.5, 4.5] range
    alt = (jumps.shift - expected).abs() < 1e-12
    _assert_binomial(int(alt.sum()), 20_000, 0.3)
    assert bool(((jumps.shift[~alt] >= 2.5) & (jumps.shift[~alt] <= 4.5)).all())
    with pytest.raises(ValueError, match="num_tokens"):
        sample_jumps(8, spec, _gen(1))


@pytest.mark.parametrize("fraction, batch, expected", [(0.0, 64, 0), (0.25, 64, 16), (1.0, 64, 64), (0.25, 10, 2)])
def test_flow_fraction_exact_row_count(fraction, batch, expected):
    jumps = sample_jumps(batch, JumpSampling(flow_fraction=fraction), _gen(2))
    flow = jumps.mode == FLOW
    assert int(flow.sum()) == expected == round(fraction * batch)
    assert bool((jumps.num_steps[flow] == 0).all()) and bool((jumps.start[flow] == 0).all())
    # FLOW rows use one continuous sigma in [0, FIRST_SIGMA]
    s = jumps.sigmas[flow]
    assert bool((s == s[:, :1]).all())
    assert bool((s >= 0).all()) and bool((s <= FIRST_SIGMA).all())


def test_flow_sigma_unshifted_is_uniform():
    spec = JumpSampling(flow_fraction=1.0, shift_range=(1.0, 1.0), alt_shift_prob=0.0)
    sigma = sample_jumps(BIG, spec, _gen(3)).sigma
    for q in range(4):
        _assert_binomial(int(((sigma >= q / 4) & (sigma < (q + 1) / 4)).sum()), BIG, 0.25)


def test_t_skip_four():
    spec = JumpSampling(t_skip=4, self_grids=(4, 8, 16), flow_fraction=0.0)
    jumps = sample_jumps(20_000, spec, _gen(4))
    assert jumps.t_skip == 4 and jumps.sigmas.shape == (20_000, 5)
    assert bool((jumps.start % 2 == 0).all()) and bool((jumps.start <= jumps.num_steps - 4).all())
    assert set(jumps.start[jumps.num_steps == 4].tolist()) == {0}
    assert set(jumps.start[jumps.num_steps == 8].tolist()) == {0, 2, 4}
    expected = _expected_sigmas(jumps.num_steps, jumps.start, jumps.shift, 4)
    torch.testing.assert_close(jumps.sigmas, expected, rtol=0, atol=1e-14)


def test_two_step_grid_is_a_one_step_target():
    spec = JumpSampling(teacher_prob=0.0, self_grids=(2,), shift_range=(3.0, 3.0), alt_shift_prob=0.0)
    jumps = sample_jumps(100, spec, _gen(5))
    assert bool((jumps.start == 0).all())
    torch.testing.assert_close(jumps.sigmas[:, 0], torch.full((100,), 1 - 1e-5, dtype=torch.float64))
    torch.testing.assert_close(jumps.sigmas[:, 1], torch.full((100,), 0.75, dtype=torch.float64))
    assert bool((jumps.sigmas[:, 2] == 0).all())


def test_no_teacher_rows_without_teacher():
    jumps = sample_jumps(10_000, JumpSampling(teacher_prob=1.0), _gen(6), allow_teacher=False)
    assert not bool((jumps.mode == TEACHER).any())
    assert bool((jumps.mode == SELF).all())


def test_teacher_prob_one_gives_only_teacher_rows():
    jumps = sample_jumps(1000, JumpSampling(teacher_prob=1.0, flow_fraction=0.5), _gen(7))
    assert int((jumps.mode == TEACHER).sum()) == 500 and int((jumps.mode == FLOW).sum()) == 500


def test_same_generator_seed_same_batch():
    a = sample_jumps(256, JumpSampling(flow_fraction=0.25), _gen(8))
    b = sample_jumps(256, JumpSampling(flow_fraction=0.25), _gen(8))
    for name in ("sigmas", "mode", "num_steps", "start", "shift"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"t_skip": 3}, "t_skip"),
        ({"t_skip": 0}, "t_skip"),
        ({"t_skip": 4, "self_grids": (2, 4, 8)}, "self_grids"),
        ({"t_skip": 4, "teacher_grid": 2}, "teacher_grid"),
        ({"self_grids": (2, 5)}, "self_grids"),
        ({"teacher_grid": 31}, "teacher_grid"),
        ({"self_grids": ()}, "self_grids"),
        ({"teacher_prob": 1.5}, "teacher_prob"),
        ({"teacher_prob": -0.1}, "teacher_prob"),
        ({"flow_fraction": 1.01}, "flow_fraction"),
        ({"flow_fraction": -0.5}, "flow_fraction"),
        ({"alt_shift_prob": 2.0}, "alt_shift_prob"),
        ({"shift_range": (0.0, 1.0)}, "shift_range"),
        ({"shift_range": (3.0, 2.0)}, "shift_range"),
        ({"shift_range": (1.0, 2.0, 3.0)}, "shift_range"),
        ({"alt_shift": "static"}, "alt_shift"),
        ({"alt_shift": -1.0}, "alt_shift"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"jumps\.{field}\b"):
        JumpSampling(**kwargs)
