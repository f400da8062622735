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
from shortcutfm.core.calibration import (
    DEFAULT_SCALES,
    CalibratedVelocity,
    StepCalibration,
    WeightInterpolation,
    calibrate,
    one_standard_error_choice,
)
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


def test_the_paired_rule_keeps_the_student_unless_a_scale_beats_it_beyond_one_standard_error():
    """The defining property of the one-standard-error rule: a scale away from 1 is chosen only when its paired gain
    over scale 1 exceeds one standard error of the per-sample difference."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=generator, dtype=torch.float64) + 1.0
    noise = torch.randn(64, generator=generator, dtype=torch.float64)
    noise = (noise - noise.mean()) / noise.std()  # exactly mean 0, standard deviation 1
    standard_error = 0.1 / 64**0.5  # of a difference with standard deviation 0.1
    slight = {1.0: base, 1.25: base - 0.5 * standard_error + 0.1 * noise, 0.5: base + 0.2}
    assert float(slight[1.25].mean()) < float(slight[1.0].mean())  # 1.25 is the plain minimum...
    assert one_standard_error_choice(slight) == 1.0  # ...by less than the samples resolve
    clear = {1.0: base, 1.25: base - 2 * standard_error + 0.1 * noise, 0.5: base + 0.2}
    assert one_standard_error_choice(clear) == 1.25
    consistent = {1.0: base, 1.5: base - 1e-3, 2.0: base - 2e-3}  # no spread: any gain is resolved
    assert one_standard_error_choice(consistent) == 2.0
    near = {0.0: base - 2e-3, 0.5: base - 2e-3 + 1e-4 * noise, 1.0: base + 1.0}  # a tie within noise: nearest 1
    assert one_standard_error_choice(near) == 0.5
    single = {1.0: torch.tensor([1.0], dtype=torch.float64), 1.25: torch.tensor([0.999], dtype=torch.float64)}
    assert one_standard_error_choice(single) == 1.25  # one sample has no standard error: the best is kept


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
        assert table[loaded.calibration.scales[n]] == min(table.values()) and len(table) == len(DEFAULT_SCALES)


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


# ---------------------------------------------------------------- LoRA students


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from PIL import Image

    from diffusers_fixtures import SEQUENCE_LENGTH, tiny_pipeline
    from shortcutfm.preparation import prepare_from_folder
    from shortcutfm.sampling import load_pipeline

    tmp = tmp_path_factory.mktemp("lora_calibration")
    tiny_pipeline("sd3").save_pretrained(tmp / "pipe")
    (tmp / "images").mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(tmp / "images" / f"{i}.png")
        (tmp / "images" / f"{i}.txt").write_text(f"a photo of {['cat', 'dog'][i % 2]}")
    pipe = load_pipeline(str(tmp / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    prepare_from_folder(pipe, tmp / "images", tmp / "cache", height=16, width=16,
                        max_sequence_length=SEQUENCE_LENGTH["sd3"], show_progress=False)
    config = load_config(resolve_config_path("sd3"), [
        f"data.source={tmp / 'cache'}", f"model.pretrained={tmp / 'pipe'}", "model.dtype=float32",
        'train.mixed_precision="no"', "lora.rank=4", "lora.alpha=4", "train.steps=3", "train.batch_size=2",
        "jumps.teacher_grid=4", "jumps.self_grids=[2,4]", "eval.every=3", "eval.num_samples=2", "optim.lr=1e-2",
        f"train.output_dir={tmp / 'run'}", "calibration.steps=[1,2,4]", "calibration.scales=[0.0,0.5,1.0,1.5]"])
    return config, run_training(config, progress=False)


def test_a_lora_run_stores_its_calibration_beside_and_in_the_lora_file(lora_run):
    from safetensors import safe_open

    from shortcutfm.models.diffusers.export import CALIBRATION_METADATA_KEY, STUDENT_WEIGHTS, read_calibration

    _, result = lora_run
    calibration = read_calibration(result.model_dir)
    assert set(calibration.scales) == {1, 2, 4} and calibration.shift == 3.0  # the sd3 family's select shift
    for n, table in calibration.errors.items():
        assert set(table) == {0.0, 0.5, 1.0, 1.5} and table[calibration.scales[n]] == min(table.values())
    with safe_open(str(result.model_dir / STUDENT_WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()
    assert StepCalibration.from_dict(json.loads(metadata[CALIBRATION_METADATA_KEY])) == calibration
    assert "lora_adapter_metadata" in metadata  # diffusers' own metadata is kept (alpha != rank loads right)
    card = (result.model_dir / "README.md").read_text()  # the model card tells a diffusers user the scales
    assert "LoRA scale per step count" in card and f"1 steps: {calibration.scales[1]:g}" in card
    (result.model_dir / "calibration.json").rename(result.model_dir / "moved.json")
    try:
        assert read_calibration(result.model_dir) == calibration  # the file's metadata alone suffices
    finally:
        (result.model_dir / "moved.json").rename(result.model_dir / "calibration.json")


def test_lora_sample_and_eval_fuse_each_step_counts_calibrated_scale(lora_run, tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    import shortcutfm.models.diffusers as diffusers_models
    from shortcutfm.evaluation.lora_eval import LoraEvalSettings, evaluate_lora
    from shortcutfm.models.diffusers.export import read_calibration, write_calibration
    from shortcutfm.sampling import sample_diffusers

    config, result = lora_run
    calibration = read_calibration(result.model_dir)
    wanted = StepCalibration({1: 1.5, 2: 0.5, 4: 0.0}, calibration.shift, errors=calibration.errors)
    write_calibration(result.model_dir, wanted)  # distinct scales, so a wrong lookup shows
    fused = []
    real_fuse = diffusers_models.fuse_lora

    def recording_fuse(pipe, name, scale):
        fused.append(scale)
        return real_fuse(pipe, name, scale)

    monkeypatch.setattr(diffusers_models, "fuse_lora", recording_fuse)
    for steps in (1, 2, 3):
        sample_diffusers(result.model_dir, pretrained=None, prompts=["a cat"], steps=steps, shift=None, lora_scale=None,
                         seed=0, out=tmp_path / f"s{steps}.png")
    sample_diffusers(result.model_dir, pretrained=None, prompts=["a cat"], steps=2, shift=None, lora_scale=1.25,
                     seed=0, out=tmp_path / "given.png")
    assert fused == [1.5, 0.5, 0.0, 1.25]  # 3 steps: the nearest calibrated count (4, in log steps)

    scales = []
    real = StableDiffusion3Pipeline.fuse_lora

    def recording_pipeline_fuse(self, lora_scale=1.0, **kwargs):
        scales.append(lora_scale)
        return real(self, lora_scale=lora_scale, **kwargs)

    monkeypatch.setattr(StableDiffusion3Pipeline, "fuse_lora", recording_pipeline_fuse)
    settings = LoraEvalSettings(pipeline=config.model.pretrained, lora_dir=str(result.model_dir), prompts=["a cat", "a dog"],
                                steps=(1, 2, 4), teacher_steps=4, height=16, width=16, max_sequence_length=8, batch_size=2)
    report = evaluate_lora(settings, tmp_path / "eval", fid_features=None, progress=False)
    assert scales == [1.5, 0.5, 0.0]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["lora_scales"] == {"1": 1.5, "2": 0.5, "4": 0.0} and metrics["calibrated"] is True
    # at scale 0 the student is the teacher: its 4-step images equal the teacher's 4-step ones
    torch.testing.assert_close(report.images[("student", 4)], report.images[("teacher", 4)], atol=1e-5, rtol=1e-5)
