"""Step-count calibration: the exact best scale on a closed-form flow, the interpolation line, storage beside a
distilled model, and `sample` / the step sweep sampling each step count at its scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from shortcutfm.config import ConfigError, load_config
from shortcutfm.core import euler_sample
from shortcutfm.core.calibration import CalibratedVelocity, StepCalibration, WeightInterpolation, calibrate
from shortcutfm.core.grids import sigma_grid
from shortcutfm.data import Normalization
from shortcutfm.models.builtin import CALIBRATION, TEACHER_WEIGHTS, load_model
from shortcutfm.sampling import sample_builtin
from shortcutfm.training.builtin import deployed_velocity
from shortcutfm.workflows import resolve_config_path, run_training

torch.set_num_threads(1)


class CurvedFlow(nn.Module):
    """``v = (x - m) / sigma + w sigma^2``: its Euler endpoint on a grid ending ``sigma_{N-1}, 0`` is exactly
    ``m - w sigma_{N-1}^3`` whatever the noise (the first term carries x to m along straight lines)."""

    def __init__(self, m: float, w: float):
        super().__init__()
        self.m = nn.Parameter(torch.tensor(m))
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x, sigma, **cond):
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        return (x - self.m) / s + self.w * s**2


def test_calibrate_finds_the_exact_best_scale_of_a_closed_form_flow():
    """Teacher (m_T, w), student (m_S, w): the student's N-step endpoint at scale a is m_T + a (m_S - m_T) -
    w s_{N-1}^3, the teacher's 32-step one m_T - w s_31^3, so the best scale is a* = w (s_{N-1}^3 - s_31^3) /
    (m_S - m_T); calibrate picks the grid scale nearest a*, and a* differs for every N."""
    teacher, student = CurvedFlow(0.5, 1.0), CurvedFlow(1.0, 1.0)
    interpolation = WeightInterpolation(student, teacher.state_dict())
    scales = [round(-1 + 0.01 * i, 2) for i in range(401)]
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    steps = [1, 2, 4, 8]
    result = calibrate(interpolation.at, teacher, noise, steps, scales=scales, shift=1.0)
    last_reference = sigma_grid(32, 1.0)[-2].item()
    for n in steps:
        last = sigma_grid(n, 1.0)[-2].item()
        exact = (last**3 - last_reference**3) / 0.5
        assert result.scales[n] == pytest.approx(exact, abs=0.006), n
        assert min(result.errors[n].values()) == result.errors[n][result.scales[n]] < 1e-4
    assert result.scales[1] > result.scales[2] > result.scales[4] > result.scales[8]  # 2.0, 0.25, 0.03, 0.0


class LinearVelocity(nn.Linear):
    def forward(self, x, sigma, **cond):
        return super().forward(x)


def test_weight_interpolation_is_the_line_between_teacher_and_student():
    torch.manual_seed(0)
    teacher, student = LinearVelocity(3, 3), LinearVelocity(3, 3)
    before = student.weight.detach().clone()
    interpolation = WeightInterpolation(student, teacher.state_dict())
    x, sigma = torch.randn(4, 3), torch.ones(4)
    assert interpolation.at(1.0) is student
    for a in (0.0, 0.3, 1.5):
        expected = nn.functional.linear(x, teacher.weight + a * (student.weight - teacher.weight),
                                        teacher.bias + a * (student.bias - teacher.bias))
        torch.testing.assert_close(interpolation.at(a)(x, sigma), expected)
    torch.testing.assert_close(interpolation.at(0.0)(x, sigma), teacher(x, sigma))
    assert torch.equal(student.weight, before)  # the live module is untouched
    with pytest.raises(ValueError, match="architecture"):
        WeightInterpolation(student, {"weight": teacher.weight})


def test_scale_for_uncalibrated_counts_and_the_stored_form():
    calibration = StepCalibration({1: 1.5, 4: 0.75, 32: 0.25}, shift=1.0, errors={4: {0.75: 1e-3, 1.0: 2e-3}})
    assert calibration.scale_for(4) == 0.75
    assert calibration.scale_for(2) == 0.75  # log2 2 is 1 from both 1 and 4: the larger count
    assert calibration.scale_for(3) == 0.75 and calibration.scale_for(16) == 0.25 and calibration.scale_for(100) == 0.25
    again = StepCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again == calibration


TINY = ["model.width=32", "model.depth=2", "train.batch_size=64", "data.num_toy_samples=2000"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrated")
    teacher = run_training(load_config(resolve_config_path("pretrain"), TINY + [
        "data.source=checkerboard", f"train.output_dir={tmp / 'teacher'}", "train.steps=30"]), progress=False)
    config = load_config(resolve_config_path("distill"), TINY + [
        "data.source=checkerboard", f"train.teacher={teacher.model_dir}", f"train.output_dir={tmp / 'student'}",
        "train.steps=20", "eval.every=0", "jumps.self_grids=[2,4]", "jumps.teacher_grid=8",
        "calibration.steps=[1,2,8]", "calibration.num_samples=256"])
    return config, run_training(config, progress=False), teacher.model_dir


def test_distillation_stores_its_calibration_and_the_teacher_beside_the_model(distilled):
    config, result, teacher_dir = distilled
    assert (result.model_dir / CALIBRATION).is_file() and (result.model_dir / TEACHER_WEIGHTS).is_file()
    loaded = load_model(result.model_dir)
    assert set(loaded.calibration.scales) == {1, 2, 8} and loaded.calibration.shift == config.eval.select_shift
    teacher = load_model(teacher_dir).module.state_dict()
    assert all(torch.equal(loaded.teacher_state[k], v) for k, v in teacher.items())
    # the recorded choice is the best of its table
    for n, table in loaded.calibration.errors.items():
        assert table[loaded.calibration.scales[n]] == min(table.values()) and len(table) == 7


def test_sample_uses_the_calibrated_scale_of_its_step_count(distilled, tmp_path):
    _, result, _ = distilled
    loaded = load_model(result.model_dir)
    loaded.calibration.scales = {1: 0.5, 2: 1.0, 8: 0.25}  # distinct scales, so a wrong lookup shows
    (result.model_dir / CALIBRATION).write_text(json.dumps(loaded.calibration.to_dict()))
    velocity = deployed_velocity(load_model(result.model_dir))
    assert isinstance(velocity, CalibratedVelocity)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    interpolation = WeightInterpolation(loaded.module, loaded.teacher_state)
    for steps, scale in [(1, 0.5), (8, 0.25), (6, 0.25)]:
        expected = euler_sample(interpolation.at(scale), noise, sigma_grid(steps, 1.0)).x
        out = sample_builtin(result.model_dir, steps=steps, num=64, seed=3, out=tmp_path / f"s{steps}.npz")[0]
        x = torch.from_numpy(np.load(out)["x"])
        normalization = Normalization.from_dict(loaded.info.data.normalization)
        torch.testing.assert_close(x, normalization.to_data_space(expected))
    plain = euler_sample(loaded.module, noise, sigma_grid(1, 1.0)).x
    assert (plain - euler_sample(interpolation.at(0.5), noise, sigma_grid(1, 1.0)).x).abs().max() > 1e-4


def test_calibration_fields_without_effect_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="calibration.steps"):
        load_config(resolve_config_path("pretrain"), ["calibration.steps=[2]"])
    with pytest.raises(ConfigError, match="calibration.num_samples"):
        load_config(resolve_config_path("sd3"), ["calibration.num_samples=8"])
    with pytest.raises(ConfigError, match="calibration.steps must be step counts"):
        load_config(resolve_config_path("distill"), ["calibration.steps=[0]"])


def test_a_malformed_calibration_file_is_named(distilled, tmp_path):
    import shutil

    _, result, _ = distilled
    copy = shutil.copytree(result.model_dir, tmp_path / "model")
    (copy / CALIBRATION).write_text("{not json")
    with pytest.raises(ValueError, match="calibration.json is malformed"):
        load_model(copy)
    (copy / CALIBRATION).write_text(json.dumps(load_model(result.model_dir).calibration.to_dict()))
    (copy / TEACHER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="teacher.safetensors"):
        load_model(copy)


def test_cli_calibrates_a_finished_run_again(distilled, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from shortcutfm.cli import app

    _, result, _ = distilled
    run = shutil.copytree(result.run_dir, tmp_path / "run")
    for name in (CALIBRATION, TEACHER_WEIGHTS):
        (run / "model" / name).unlink()
    assert load_model(run / "model").calibration is None
    invoked = CliRunner().invoke(app, ["calibrate", str(run), "calibration.steps=[2,3]", "calibration.num_samples=64"])
    assert invoked.exit_code == 0, invoked.output
    assert set(load_model(run / "model").calibration.scales) == {2, 3}
    refused = CliRunner().invoke(app, ["calibrate", str(tmp_path / "nothing")])
    assert refused.exit_code != 0 and "not a finished training run" in refused.output
