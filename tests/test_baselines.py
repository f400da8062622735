"""Each baseline's defining property, checked against exact answers where a closed-form flow gives them, and a
quick run of the whole bench."""

from __future__ import annotations

import json

import pytest
import torch

from gaussian_flow import GaussianFlow
from shortcutfm.baselines import BUDGETS, run_bench
from shortcutfm.baselines.consistency import ConsistencyDistillation, consistency_function, consistency_target
from shortcutfm.baselines.meanflow import meanflow_target
from shortcutfm.baselines.progressive import ProgressiveDistillation, two_step_target
from shortcutfm.baselines.reflow import reflow_batch, teacher_pairs
from shortcutfm.baselines.shortcut import self_consistency_target
from shortcutfm.baselines.solvers import flow_scheduler, solve
from shortcutfm.baselines.two_time import TwoTimeNetwork
from shortcutfm.core.grids import sigma_grid
from shortcutfm.models.convnet import VelocityConvNet
from shortcutfm.models.mlp import VelocityMLP

FLOW = GaussianFlow(mu=torch.tensor([1.5, -0.5]), std=torch.tensor([0.3, 0.8]))


def points(batch=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, generator=generator, dtype=torch.float64)
    t = 0.2 + 0.8 * torch.rand(batch, generator=generator, dtype=torch.float64)
    return x, t


def euler(velocity, x, t, t_next):
    return x + (t_next - t).unsqueeze(1) * velocity(x, t)


def test_progressive_target_is_two_teacher_steps_in_one():
    x, t = points()
    t_next = t - 0.15
    target = two_step_target(FLOW.velocity, x, t, t_next)
    t_mid = (t + t_next) / 2
    two_steps = euler(FLOW.velocity, euler(FLOW.velocity, x, t, t_mid), t_mid, t_next)
    torch.testing.assert_close(x + (t_next - t).unsqueeze(1) * target, two_steps, rtol=0, atol=1e-12)


def test_progressive_stages_halve_the_steps_and_promote_the_student():
    teacher = VelocityMLP((2,), width=16, depth=1)
    method = ProgressiveDistillation(teacher, total_steps=50, start_steps=32)
    assert (method.stages, method.steps_per_stage, method.student_steps) == (5, 10, 16)
    assert method.stage_teacher is method.teacher
    method.after_step(10)
    assert method.student_steps == 8 and method.stage_teacher is not method.teacher
    for a, b in zip(method.stage_teacher.parameters(), method.student.parameters()):
        assert torch.equal(a, b) and not a.requires_grad


def test_consistency_target_is_the_ema_at_the_teachers_next_point():
    x, t = points()
    t_prev = t - 0.1

    def ema(z, s):  # any network: here the exact velocity scaled, so the EMA differs from the teacher
        return 0.9 * FLOW.velocity(z, s)

    target = consistency_target(ema, FLOW.velocity, x, t, t_prev)
    x_prev = euler(FLOW.velocity, x, t, t_prev)
    torch.testing.assert_close(target, x_prev - t_prev.unsqueeze(1) * ema(x_prev, t_prev), rtol=0, atol=1e-12)
    # the boundary condition f(x, 0) = x holds whatever the network
    assert torch.equal(consistency_function(ema, x, torch.zeros(len(x), dtype=x.dtype)), x)


def test_consistency_ema_follows_the_student_after_each_step():
    method = ConsistencyDistillation(VelocityMLP((2,), width=16, depth=1), ema_decay=0.75)
    before = [p.detach().clone() for p in method.ema.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_step(1)
    for old, new, live in zip(before, method.ema.parameters(), method.student.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * live, rtol=0, atol=1e-6)


def test_reflow_pairs_are_teacher_samples_and_the_path_is_straight():
    generator = torch.Generator().manual_seed(0)

    def teacher(x, sigma):
        return FLOW.velocity(x.double(), sigma.double()).float()

    noise, samples = teacher_pairs(teacher, 512, (2,), None, steps=256, generator=generator)
    exact = FLOW.flow(noise.double(), 1.0, 0.0)  # the teacher's ODE map of each noise row
    assert (samples.double() - exact).abs().max() < 0.02
    t = torch.rand(512, generator=generator)
    x, target = reflow_batch(noise, samples, t)
    torch.testing.assert_close(x - t.unsqueeze(1) * target, samples, rtol=0, atol=1e-5)  # one step to the sample
    torch.testing.assert_close(x + (1 - t).unsqueeze(1) * target, noise, rtol=0, atol=1e-5)  # and back to the noise


@pytest.mark.parametrize("network", [VelocityMLP((2,), width=16, depth=2), VelocityConvNet((1, 8, 8), channels=8, blocks=1,
                                                                                          num_classes=3)])
def test_zero_initialised_second_time_input_leaves_the_teacher_unchanged(network):
    shape = (5, *([2] if isinstance(network, VelocityMLP) else [1, 8, 8]))
    generator = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(shape, generator=generator), torch.rand(5, generator=generator)
    cond = {} if isinstance(network, VelocityMLP) else {"y": torch.tensor([0, 1, 2, 0, 3])}
    with torch.no_grad():
        for p in network.parameters():  # a "trained" teacher: fresh networks output exactly zero
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
        expected = network(x, sigma, **cond)
        assert expected.abs().max() > 0
        wrapped = TwoTimeNetwork(network)
        for second in (torch.zeros(5), torch.rand(5, generator=generator), torch.ones(5)):
            assert torch.equal(wrapped(x, sigma, second, **cond), expected)
        next(p for p in wrapped.network.sigma_embed.extra.parameters()).add_(0.5)  # once trained it differs
        wrapped.network.sigma_embed.extra.mlp[-1].bias.add_(0.5)
        assert not torch.equal(wrapped(x, sigma, torch.rand(5, generator=generator), **cond), expected)


def test_shortcut_self_consistency_target_of_exact_shortcuts_is_the_exact_double_step():
    x, t = points()
    d = torch.full_like(t, 0.08)

    def exact_shortcut(z, s, step):  # the exact average velocity over [s - step, s]
        return FLOW.average_velocity(z, s, s - step)

    target = self_consistency_target(exact_shortcut, x, t, d)
    torch.testing.assert_close(target, FLOW.average_velocity(x, t, t - 2 * d), rtol=0, atol=1e-10)


def test_meanflow_identity_holds_for_the_closed_form_flow():
    """With the exact average velocity u and exact v, the MeanFlow target v - (t - r) du/dt equals u."""
    x, t = points()
    h = t * torch.rand(len(t), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def average(z, s, interval):
        return FLOW.average_velocity(z, s, s - interval)

    u, target = meanflow_target(average, x, t, h, FLOW.velocity(x, t))
    torch.testing.assert_close(target, u, rtol=0, atol=1e-9)
    # and the identity is not trivially true: with a wrong v the target moves
    _, wrong = meanflow_target(average, x, t, h, 1.1 * FLOW.velocity(x, t))
    assert (wrong - u).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_diffusers_solvers_run_on_our_sigma_convention_and_are_second_order(name):
    scheduler = flow_scheduler(name)
    scheduler.set_timesteps(8)
    torch.testing.assert_close(scheduler.sigmas.double(), sigma_grid(8, 1.0, dtype=torch.float64), rtol=0, atol=2e-3)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = FLOW.flow(noise, 1.0, 0.0)
    errors = {}
    for solver in (name, "euler"):
        for steps in (8, 16):
            x, nfe = solve(solver, FLOW.velocity, noise, steps, {})
            errors[solver, steps] = float((x - exact).abs().max())
            assert nfe == steps
    # driven on the right sigmas, a second-order multistep solver's error falls about 4x per halved step
    # (Euler's 2x), and it beats Euler at equal NFE
    assert errors[name, 16] < 0.3 * errors[name, 8] and errors["euler", 16] > 0.45 * errors["euler", 8]
    assert errors[name, 16] < 0.2 * errors["euler", 16]


def test_midpoint_is_second_order():
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = FLOW.flow(noise, 1.0, 0.0)
    coarse = float((solve("midpoint", FLOW.velocity, noise, 4, {})[0] - exact).abs().max())
    fine = float((solve("midpoint", FLOW.velocity, noise, 8, {})[0] - exact).abs().max())
    assert coarse / fine > 3.0  # halving the step divides the error by 4 or more (Euler: by about 2)


def test_quick_bench_reports_every_method_at_every_nfe(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTCUTFM_CACHE", str(tmp_path / "cache"))
    summary = run_bench("checkerboard", tmp_path / "bench", budget=BUDGETS["quick"], progress=False,
                        solvers=("euler", "heun", "dpmsolver++"))
    rows = summary["rows"]
    for method in ("scfm", "progressive", "consistency", "reflow", "shortcut", "meanflow"):
        nfes = sorted(r["nfe"] for r in rows if r["method"] == method and r["metric"] == "energy_distance")
        assert nfes == [1, 2, 4, 8], method
        runs = summary["training"][method]["runs"]
        assert [r["lr"] for r in runs] == [1e-4, 3e-4]  # the same learning-rate search for every method
        assert summary["training"][method]["selection_score"] == min(r["best_score"] for r in runs)
    heun = sorted(r["nfe"] for r in rows if r["method"] == "teacher-heun" and r["metric"] == "energy_distance")
    assert heun == [1, 3, 7, 15, 31]
    saved = json.loads((tmp_path / "bench" / "metrics.json").read_text())
    assert saved["budget"]["steps"] == 6 and (tmp_path / "bench" / "report.md").is_file()
    assert (tmp_path / "bench" / "checkerboard_energy_distance_vs_nfe.png").stat().st_size > 10_000
