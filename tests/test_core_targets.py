"""SCFM targets and loss against closed forms (docs/method.md, "The target")."""

import pytest
import torch
from torch import nn

from gaussian_flow import GaussianFlow
from shortcutfm.core.jumps import FLOW, SELF, TEACHER, JumpBatch, JumpSampling, sample_jumps
from shortcutfm.core.targets import TargetVelocities, scfm_loss, scfm_targets

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _fixed_jumps(sigmas: torch.Tensor, mode: torch.Tensor) -> JumpBatch:
    """A JumpBatch with given (B, T + 1) sigmas (the grid bookkeeping fields are not used by the target)."""
    batch = sigmas.shape[0]
    zeros = torch.zeros(batch, dtype=torch.long)
    return JumpBatch(
        sigmas=sigmas, mode=mode, num_steps=zeros, start=zeros, shift=torch.ones(batch, dtype=F64),
        t_skip=sigmas.shape[1] - 1,
    )


class Recorder:
    """A fake velocity model with a constant output that logs every call (name, x, sigma, cond)."""

    def __init__(self, name, value, log):
        self.name, self.value, self.log = name, value, log

    def __call__(self, x, sigma, **cond):
        self.log.append((self.name, x.clone(), sigma.clone(), {k: v.clone() for k, v in cond.items()}))
        return torch.full_like(x, self.value)


def _recorders(log, teacher=3.0, fast=-5.0, slow=7.0):
    return TargetVelocities(
        teacher=Recorder("teacher", teacher, log), fast_ema=Recorder("fast", fast, log),
        slow_ema=Recorder("slow", slow, log),
    )


# ---------------------------------------------------------------------------------------------------------
# the closed-form helper itself (the tests below rely on it)


def test_gaussian_flow_helper_is_consistent():
    flow = GaussianFlow(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.2, 1.0, 1.5]))
    x = torch.randn(64, 3, generator=_gen(1), dtype=F64)
    s, ds = torch.full((64,), 0.6, dtype=F64), 1e-6
    # the flow map solves the ODE whose right-hand side is the velocity
    derivative = (flow.flow(x, s, s + ds) - flow.flow(x, s, s - ds)) / (2 * ds)
    torch.testing.assert_close(derivative, flow.velocity(x, s), rtol=1e-6, atol=1e-6)
    # the flow map composes and is the identity on the same sigma
    torch.testing.assert_close(flow.flow(flow.flow(x, 0.9, 0.5), 0.5, 0.1), flow.flow(x, 0.9, 0.1))
    torch.testing.assert_close(flow.flow(x, 0.4, 0.4), x)
    # the velocity is the conditional expectation of noise - x0: average over many (x0, noise) pairs near x
    x0 = flow.sample_data(400_000, _gen(2))
    noise = torch.randn(400_000, 3, generator=_gen(3), dtype=F64)
    xs = 0.4 * x0 + 0.6 * noise
    moments = torch.linalg.lstsq(torch.stack([torch.ones_like(xs[:, 0]), xs[:, 0]], 1), (noise - x0)[:, :1]).solution
    point = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    v = flow.velocity(point, torch.full((2,), 0.6, dtype=F64))[:, 0]
    torch.testing.assert_close(moments[0, 0], v[0], atol=5e-3, rtol=0)  # intercept
    torch.testing.assert_close(moments[1, 0], v[1] - v[0], atol=5e-3, rtol=0)  # slope
    # samples pushed from noise (sigma = 1) to data (sigma = 0) have the data's moments
    data = flow.flow(noise, 1.0, 0.0)
    torch.testing.assert_close(data.mean(0), flow.mu, atol=0.02, rtol=0)
    torch.testing.assert_close(data.std(0), flow.std, atol=0.02, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# (i) straight paths: the target is exact for any t_skip, grid and shift


@pytest.mark.parametrize(
    "spec",
    [
        JumpSampling(),
        JumpSampling(t_skip=4, self_grids=(4, 8, 16), shift_range=(1.0, 1.0), alt_shift_prob=0.0),
        JumpSampling(t_skip=8, teacher_grid=64, self_grids=(8, 16, 32), shift_range=(0.5, 6.0)),
        JumpSampling(t_skip=16, self_grids=(16,), teacher_prob=0.0),
    ],
    ids=["default", "tskip4-unshifted", "tskip8-wide-shift", "tskip16-full"],
)
def test_single_point_data_target_is_exact(spec):
    flow = GaussianFlow(torch.tensor([0.7, -1.3, 2.0, 0.0]), torch.zeros(4))
    batch = 512
    jumps = sample_jumps(batch, spec, _gen(10))
    x0 = flow.mu.expand(batch, 4).clone()
    noise = torch.randn(batch, 4, generator=_gen(11), dtype=F64)
    field = TargetVelocities(teacher=flow.velocity, fast_ema=flow.velocity, slow_ema=flow.velocity)
    out = scfm_targets(x0, noise, jumps, field)
    exact = flow.average_velocity(out.x, jumps.sigmas[:, 0], jumps.sigmas[:, -1])
    torch.testing.assert_close(out.target, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.target, noise - x0, rtol=0, atol=1e-6)  # straight paths: the FM velocity


# ---------------------------------------------------------------------------------------------------------
# (ii) curved paths: more sub-steps approach the exact average velocity, first order


def test_gaussian_data_target_converges_first_order():
    flow = GaussianFlow(torch.tensor([1.5, -2.0, 0.5]), torch.tensor([0.1, 0.4, 2.5]))
    batch, s_a, s_c = 256, 0.95, 0.05
    x0 = flow.sample_data(batch, _gen(20))
    noise = torch.randn(batch, 3, generator=_gen(21), dtype=F64)
    field = TargetVelocities(teacher=flow.velocity, fast_ema=flow.velocity, slow_ema=flow.velocity)
    mode = torch.where(torch.arange(batch) % 2 == 0, TEACHER, SELF)
    errors = []
    for t_skip in (2, 4, 8, 16):
        sigmas = torch.linspace(s_a, s_c, t_skip + 1, dtype=F64).expand(batch, -1)
        out = scfm_targets(x0, noise, _fixed_jumps(sigmas, mode), field)
        exact = flow.average_velocity(out.x, s_a, s_c)
        errors.append((out.target - exact).abs().mean().item())
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    assert errors[0] > 0.05  # the paths are curved: a two-step target is visibly off
    assert all(r > 1.0 for r in ratios), errors  # monotone decrease
    assert all(1.6 < r < 2.6 for r in ratios), ratios  # first order: halving the step halves the error


# ---------------------------------------------------------------------------------------------------------
# (iii) and (vi) FLOW rows


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.25, 8), (1.0, 32)])
def test_flow_rows_get_the_flow_matching_target(fraction, expected):
    log = []
    jumps = sample_jumps(32, JumpSampling(flow_fraction=fraction), _gen(30))
    x0 = torch.randn(32, 2, 3, generator=_gen(31), dtype=F64)
    noise = torch.randn(32, 2, 3, generator=_gen(32), dtype=F64)
    # constant velocities far from noise - x0, so only FLOW rows can equal it
    out = scfm_targets(x0, noise, jumps, _recorders(log, teacher=100.0, fast=200.0, slow=300.0))
    is_fm = (out.target == noise - x0).flatten(1).all(1)
    assert int(is_fm.sum()) == expected
    assert torch.equal(is_fm, jumps.mode == FLOW)
    assert torch.equal(out.mode, jumps.mode)
    s = jumps.sigma.view(32, 1, 1)
    torch.testing.assert_close(out.x, (1 - s) * x0 + s * noise, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.sigma, jumps.sigma, rtol=0, atol=0)
    # no network is evaluated on a FLOW row
    assert sum(call[1].shape[0] for call in log if call[0] == "slow") == 32 - expected
    if expected == 32:
        assert log == []


# ---------------------------------------------------------------------------------------------------------
# (iv) which network makes which sub-step


def test_dispatch_t_skip_two():
    log = []
    cT, cF, cS = 3.0, -5.0, 7.0
    jumps = sample_jumps(64, JumpSampling(flow_fraction=0.25, teacher_prob=0.5), _gen(40))
    x0 = torch.randn(64, 5, generator=_gen(41), dtype=F64)
    noise = torch.randn(64, 5, generator=_gen(42), dtype=F64)
    out = scfm_targets(x0, noise, jumps, _recorders(log, cT, cF, cS))

    mode, sig = jumps.mode, jumps.sigmas
    d1, d2 = sig[:, 0] - sig[:, 1], sig[:, 1] - sig[:, 2]
    first = torch.where(mode == TEACHER, cT, cF).to(F64)
    expected = ((d1 * first + d2 * cS) / (d1 + d2)).unsqueeze(1).expand(-1, 5)
    shortcut = mode != FLOW
    torch.testing.assert_close(out.target[shortcut], expected[shortcut], rtol=0, atol=1e-12)
    teacher_only = (mode == TEACHER) & shortcut
    assert not torch.allclose(expected[teacher_only], expected[mode == SELF][: int(teacher_only.sum())])

    names = [call[0] for call in log]
    assert sorted(names[:2]) == ["fast", "teacher"] and names[2:] == ["slow"]
    calls = {call[0]: call for call in log}
    for name, rows in (("teacher", mode == TEACHER), ("fast", mode == SELF)):
        _, x, sigma, _ = calls[name]
        torch.testing.assert_close(x, out.x[rows], rtol=0, atol=0)
        torch.testing.assert_close(sigma, sig[rows, 0], rtol=0, atol=0)
    _, x, sigma, _ = calls["slow"]
    x_b = out.x - d1.unsqueeze(1) * first.unsqueeze(1)  # x_b = x_a - d1 * v1
    torch.testing.assert_close(x, x_b[shortcut], rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma, sig[shortcut, 1], rtol=0, atol=0)


def _t_skip_four_targets(log, cT, cF, cS, seed, *, teacher_whole_jump=False):
    """Targets of 48 rows of 4-cell jumps (teacher and self rows) from constant recorders; returns (out, jumps)."""
    spec = JumpSampling(t_skip=4, self_grids=(4, 8, 16), teacher_prob=0.5)
    jumps = sample_jumps(48, spec, _gen(seed))
    x0 = torch.randn(48, 3, generator=_gen(seed + 1), dtype=F64)
    noise = torch.randn(48, 3, generator=_gen(seed + 2), dtype=F64)
    field = _recorders(log, cT, cF, cS)
    field.teacher_whole_jump = teacher_whole_jump
    return scfm_targets(x0, noise, jumps, field), jumps


def test_dispatch_t_skip_four_first_half_then_second_half():
    log = []
    cT, cF, cS = 2.0, -1.0, 4.0
    out, jumps = _t_skip_four_targets(log, cT, cF, cS, 50)
    names = [call[0] for call in log]
    assert sorted(names[:4]) == ["fast", "fast", "teacher", "teacher"] and names[4:] == ["slow", "slow"]
    sig = jumps.sigmas
    first_span, second_span = sig[:, 0] - sig[:, 2], sig[:, 2] - sig[:, 4]
    first = torch.where(jumps.mode == TEACHER, cT, cF).to(F64)
    expected = (first_span * first + second_span * cS) / (first_span + second_span)
    torch.testing.assert_close(out.target, expected.unsqueeze(1).expand(-1, 3), rtol=0, atol=1e-12)
    slow_sigmas = [call[2] for call in log if call[0] == "slow"]
    torch.testing.assert_close(slow_sigmas[0], sig[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(slow_sigmas[1], sig[:, 3], rtol=0, atol=0)


def test_teacher_whole_jump_takes_every_teacher_sub_step_with_the_teacher():
    """Folded guidance: teacher-taught rows are the teacher's own t_skip sub-steps; self-taught rows are unchanged
    (fast EMA, then slow EMA)."""
    log = []
    cT, cF, cS = 2.0, -1.0, 4.0
    out, jumps = _t_skip_four_targets(log, cT, cF, cS, 53, teacher_whole_jump=True)
    sig, is_teacher = jumps.sigmas, jumps.mode == TEACHER
    assert bool(is_teacher.any()) and bool((~is_teacher).any())
    first_span, second_span = sig[:, 0] - sig[:, 2], sig[:, 2] - sig[:, 4]
    first = torch.where(is_teacher, cT, cF).to(F64)
    second = torch.where(is_teacher, cT, cS).to(F64)
    expected = (first_span * first + second_span * second) / (first_span + second_span)
    torch.testing.assert_close(out.target, expected.unsqueeze(1).expand(-1, 3), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.target[is_teacher], torch.full_like(out.target[is_teacher], cT))
    assert [call[0] for call in log].count("teacher") == 4  # every sub-step, each on the teacher rows only
    assert all(call[1].shape[0] == int(is_teacher.sum()) for call in log if call[0] == "teacher")


def test_missing_teacher():
    log = []
    field = _recorders(log)
    field.teacher = None
    x0 = torch.zeros(16, 2, dtype=F64)
    with pytest.raises(ValueError, match="teacher"):
        scfm_targets(x0, x0, sample_jumps(16, JumpSampling(teacher_prob=1.0), _gen(60)), field)
    # fine when no row is teacher-taught
    jumps = sample_jumps(16, JumpSampling(), _gen(60), allow_teacher=False)
    scfm_targets(x0, x0, jumps, field)


def test_targets_carry_no_gradient_and_keep_dtype():
    net = nn.Linear(3, 3)

    def velocity(x, sigma):
        return net(x.float()) * sigma.unsqueeze(1)

    field = TargetVelocities(teacher=velocity, fast_ema=velocity, slow_ema=velocity)
    x0 = torch.randn(8, 3)
    out = scfm_targets(x0, torch.randn(8, 3), sample_jumps(8, JumpSampling(flow_fraction=0.25), _gen(61)), field)
    assert not out.target.requires_grad
    assert out.target.dtype == out.x.dtype == out.sigma.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# (v) conditioning follows its rows


def test_conditioning_is_sliced_per_row():
    batch = 40
    spec = JumpSampling(t_skip=4, self_grids=(4, 8), teacher_prob=0.5, flow_fraction=0.25)
    jumps = sample_jumps(batch, spec, _gen(70))
    row_id = torch.arange(batch, dtype=F64)
    seen = []

    def keyed(x, sigma, *, tag, label):
        # channel 0 of x carries the row id and never moves (velocity 0 there); the other channel moves by tag
        assert torch.equal(x[:, 0], tag), "x and cond rows are out of step"
        assert torch.equal(label, tag.long() * 10)
        seen.append(tag.long().tolist())
        return torch.stack([torch.zeros_like(tag), tag], 1)

    x0 = torch.stack([row_id, torch.zeros(batch, dtype=F64)], 1)
    noise = torch.stack([row_id, torch.ones(batch, dtype=F64)], 1)
    field = TargetVelocities(teacher=keyed, fast_ema=keyed, slow_ema=keyed)
    cond = {"tag": row_id.clone(), "label": torch.arange(batch) * 10}
    out = scfm_targets(x0, noise, jumps, field, cond)
    shortcut = jumps.mode != FLOW
    torch.testing.assert_close(out.target[shortcut, 1], row_id[shortcut], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.target[~shortcut], (noise - x0)[~shortcut], rtol=0, atol=0)
    # the rows every call saw are exactly its mode's rows (first half) or all shortcut rows (second half)
    teacher_rows = torch.nonzero(jumps.mode == TEACHER)[:, 0].tolist()
    self_rows = torch.nonzero(jumps.mode == SELF)[:, 0].tolist()
    shortcut_rows = torch.nonzero(shortcut)[:, 0].tolist()
    assert sorted(map(tuple, seen[:4])) == sorted([tuple(teacher_rows)] * 2 + [tuple(self_rows)] * 2)
    assert seen[4:] == [shortcut_rows, shortcut_rows]


# ---------------------------------------------------------------------------------------------------------
# (vii) the loss


def test_scfm_loss_is_plain_mse_with_per_mode_logs():
    jumps = sample_jumps(24, JumpSampling(flow_fraction=0.25, teacher_prob=0.5), _gen(80))
    x0 = torch.randn(24, 2, 4, generator=_gen(81))
    noise = torch.randn(24, 2, 4, generator=_gen(82))
    out = scfm_targets(x0, noise, jumps, _recorders([]))
    prediction = torch.randn(24, 2, 4, generator=_gen(83), requires_grad=True)
    result = scfm_loss(prediction, out)
    torch.testing.assert_close(result.loss, ((prediction - out.target) ** 2).mean())
    result.loss.backward()
    torch.testing.assert_close(prediction.grad, 2 * (prediction - out.target).detach() / prediction.numel())
    assert set(result.per_mode) == {"flow", "teacher", "self"}
    for name, code in (("flow", FLOW), ("teacher", TEACHER), ("self", SELF)):
        rows = jumps.mode == code
        manual = ((prediction[rows] - out.target[rows]) ** 2).mean().item()
        assert result.per_mode[name] == pytest.approx(manual, rel=1e-5)
    # modes absent from the batch are absent from the log
    only_self = sample_jumps(8, JumpSampling(teacher_prob=0.0), _gen(84))
    out = scfm_targets(x0[:8], noise[:8], only_self, _recorders([]))
    assert set(scfm_loss(prediction[:8], out).per_mode) == {"self"}
