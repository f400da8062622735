"""End-to-end training on tiny models: pretrain, distill, exact resume, checkpoints, best-checkpoint selection."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from shortcutfm.config import ConfigError, load_config
from shortcutfm.training import checkpoint as checkpoint_module
from shortcutfm.training import trainer as trainer_module
from shortcutfm.training.builtin import load_split
from shortcutfm.workflows import resolve_config_path, run_training

TINY = ["model.width=32", "model.depth=2", "train.batch_size=64", "train.log_every=5"]


def pretrain_config(tmp_path, source="checkerboard", steps=20, extra=()):
    convnet = "model.kind=convnet" in extra  # the MLP's tiny sizes have no effect on a convnet (refused)
    return load_config(
        resolve_config_path("pretrain"),
        ([] if convnet else TINY) + [f"data.source={source}", f"train.output_dir={tmp_path / 'teacher'}", f"train.steps={steps}",
                "data.num_toy_samples=2000", "optim.warmup_steps=5", *extra],
    )


def distill_config(tmp_path, teacher_dir, name="student", steps=20, extra=()):
    return load_config(
        resolve_config_path("distill"),
        TINY + ["data.source=checkerboard", f"train.teacher={teacher_dir}", f"train.output_dir={tmp_path / name}",
                f"train.steps={steps}", "data.num_toy_samples=2000", "eval.every=0", "jumps.self_grids=[2,4]",
                "jumps.teacher_grid=8", *extra],
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return run_training(pretrain_config(tmp, steps=30), progress=False).model_dir


def test_pretrain_writes_model_config_and_checkpoint(tmp_path):
    result = run_training(pretrain_config(tmp_path, steps=12, extra=["train.checkpoint_every=5"]), progress=False)
    run = result.run_dir
    assert (run / "config.yaml").is_file() and (run / "model" / "model.safetensors").is_file()
    info = json.loads((run / "model" / "model.json").read_text())
    assert info["trained_by"] == "pretrain" and info["sample_shape"] == [2]
    # keep_checkpoints=2: steps 10 and 12 remain, step 5 was pruned
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000010", "step-00000012"]
    # the exported pretrain model is the EMA, not the live weights
    ema = load_file(str(run / "checkpoints" / "step-00000012" / "ema.safetensors"))
    exported = load_file(str(run / "model" / "model.safetensors"))
    live = load_file(str(run / "checkpoints" / "step-00000012" / "student.safetensors"))
    name = "inp.weight"
    assert torch.equal(exported[name], ema[f"slow.{name}"])
    assert not torch.equal(exported[name], live[name])


def test_seeded_runs_reproduce(tmp_path):
    a = run_training(pretrain_config(tmp_path / "a", steps=8), progress=False)
    b = run_training(pretrain_config(tmp_path / "b", steps=8), progress=False)
    c = run_training(pretrain_config(tmp_path / "c", steps=8, extra=["train.seed=1"]), progress=False)
    wa, wb, wc = (load_file(str(r.model_dir / "model.safetensors")) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_gradient_accumulation_reproduces_the_whole_batch_step(tmp_path, teacher_dir):
    """train.gradient_accumulation=4 splits each step's batch (drawn whole) into 4 micro-batches: the weights match
    the run without accumulation up to float summation order, and differ from a run with another batch."""
    runs = {}
    for name, extra in (("whole", []), ("micro", ["train.gradient_accumulation=4"]),
                        ("other", ["train.gradient_accumulation=4", "train.batch_size=32"])):
        runs[name] = run_training(distill_config(tmp_path, teacher_dir, name=name, steps=6, extra=extra), progress=False)
    whole, micro, other = (load_file(str(runs[n].run_dir / "final" / "model.safetensors")) for n in ("whole", "micro", "other"))
    for key in whole:
        torch.testing.assert_close(micro[key], whole[key], atol=2e-6, rtol=1e-5)
    assert any((other[k] - whole[k]).abs().max() > 1e-4 for k in whole)
    with pytest.raises(ConfigError, match="multiple of train.gradient_accumulation"):
        distill_config(tmp_path, teacher_dir, extra=["train.gradient_accumulation=5"])


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("ema_mode", ["dual", "single"])
def test_killed_distillation_resumes_exactly(tmp_path, teacher_dir, monkeypatch, ema_mode):
    extra = [f"ema.mode={ema_mode}", "ema.restart_every=7", "train.checkpoint_every=10"]
    full = run_training(distill_config(tmp_path, teacher_dir, "full", extra=extra), progress=False)

    original = checkpoint_module.save_checkpoint
    calls = []

    def save_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        calls.append(path)
        raise _Killed("simulated kill right after the step-10 checkpoint")

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    killed_config = distill_config(tmp_path, teacher_dir, "killed", extra=extra)
    with pytest.raises(_Killed):
        run_training(killed_config, progress=False)
    assert [p.name for p in calls] == ["step-00000010"]
    monkeypatch.setattr(trainer_module, "save_checkpoint", original)
    resumed = run_training(killed_config, resume=True, progress=False)
    assert resumed.state.step == 20

    for filename in ("student.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(full.run_dir / "checkpoints" / "step-00000020" / filename))
        b = load_file(str(resumed.run_dir / "checkpoints" / "step-00000020" / filename))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{filename}:{key} differs after resume"


def test_distill_selects_best_checkpoint_by_few_step_metric(tmp_path, teacher_dir, monkeypatch):
    monkeypatch.setenv("SHORTCUTFM_CACHE", str(tmp_path / "cache"))
    config = distill_config(tmp_path, teacher_dir, extra=["eval.every=5", "eval.num_samples=256"])
    result = run_training(config, progress=False)
    history = result.state.history
    assert [h.step for h in history] == [5, 10, 15, 20]
    assert history[0].metric == "energy_distance@3"
    best = min(history, key=lambda h: h.value)
    assert result.state.best_step == best.step
    best_weights = load_file(str(result.run_dir / "best" / "model.safetensors"))
    exported = load_file(str(result.model_dir / "model.safetensors"))
    assert all(torch.equal(best_weights[k], exported[k]) for k in exported)


def test_incomplete_checkpoint_is_reported_and_temp_dirs_ignored(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-00000030.abc").mkdir(parents=True)  # a write killed before its rename
    (run / "checkpoints" / "step-00000020").mkdir()
    assert checkpoint_module.latest_checkpoint(run).name == "step-00000020"
    with pytest.raises(checkpoint_module.CheckpointError, match="incomplete"):
        checkpoint_module.load_checkpoint(run / "checkpoints" / "step-00000020")


def test_distill_rejects_teacher_of_other_data(tmp_path, teacher_dir):
    config = distill_config(tmp_path, teacher_dir, extra=["data.source=digits"])
    with pytest.raises(ValueError, match="teacher"):
        run_training(config, progress=False)


def test_pretrain_then_distill_runs_on_images_with_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTCUTFM_CACHE", str(tmp_path / "cache"))
    teacher = run_training(pretrain_config(tmp_path, source="digits", steps=6), progress=False).model_dir
    config = load_config(
        resolve_config_path("distill"),
        TINY + ["data.source=digits", f"train.teacher={teacher}", f"train.output_dir={tmp_path / 's'}",
                "train.steps=6", "eval.every=3", "eval.num_samples=200", "model.guidance_scale=1.5"],
    )
    result = run_training(config, progress=False)
    assert result.state.history[0].metric == "frechet_distance@3"
    assert json.loads((result.model_dir / "model.json").read_text())["model"]["guidance_scale"] == 1.5


def test_convnet_pretrains_on_labelled_images_and_uses_labels(tmp_path):
    config = pretrain_config(tmp_path, source="digits", steps=4,
                             extra=["model.kind=convnet", "model.channels=8", "model.blocks=1"])
    result = run_training(config, progress=False)
    from shortcutfm.models import VelocityConvNet, load_model

    loaded = load_model(result.model_dir)
    assert isinstance(loaded.module, VelocityConvNet)
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5)
    with torch.no_grad():
        conditional = loaded.module(x, sigma, y=torch.tensor([0, 1, 2, 3]))
        null_label = loaded.module(x, sigma, y=torch.full((4,), 10))
        unconditional = loaded.module(x, sigma)
    assert conditional.shape == x.shape
    assert torch.equal(null_label, unconditional)  # a missing label is the null label
    assert not torch.allclose(conditional, null_label)


def test_label_dropout_replaces_labels_by_the_null_label_at_its_rate():
    from shortcutfm.training.builtin import label_dropout

    labels = {"y": torch.randint(10, (20_000,), generator=torch.Generator().manual_seed(0))}
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(label_dropout(10, 0.0)(labels, generator)["y"], labels["y"])
    assert (label_dropout(10, 0.999)(labels, generator)["y"] == 10).float().mean() > 0.99
    dropped = label_dropout(10, 0.1)(labels, generator)["y"]
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.1) < 5 * (0.1 * 0.9 / 20_000) ** 0.5
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels["y"][kept])
    assert label_dropout(0, 0.5)({}, generator) == {}


def test_tensorboard_tracker_logs_loss_and_evaluations(tmp_path, teacher_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("SHORTCUTFM_CACHE", str(tmp_path / "cache"))
    config = distill_config(tmp_path, teacher_dir, steps=6,
                            extra=["train.tracker=tensorboard", "eval.every=3", "eval.num_samples=128"])
    run_training(config, progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((tmp_path / "student").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "loss" in tags and "eval/energy_distance@3" in tags
    assert [e.step for e in accumulator.Scalars("eval/energy_distance@3")] == [3, 6]


def test_folded_guidance_on_labelled_data_trains_a_one_pass_student(tmp_path):
    """Built-in class-conditional model: with model.fold_guidance the teacher target is guided while the student
    and its EMAs are plain passes, the deployed student samples without the CFG wrapper, and the flag is refused
    where there is no guidance to fold."""
    from shortcutfm.core.guidance import ClassifierFreeGuidance
    from shortcutfm.models.builtin import load_model
    from shortcutfm.core.calibration import for_steps
    from shortcutfm.training.builtin import builtin_setup, deployed_velocity

    teacher = run_training(pretrain_config(tmp_path, source="digits", steps=5), progress=False)
    overrides = TINY + ["data.source=digits", f"train.teacher={teacher.model_dir}", "train.steps=4", "eval.every=0",
                        "jumps.self_grids=[2,4]", "model.guidance_scale=1.5"]
    for fold in (False, True):
        config = load_config(resolve_config_path("distill"), overrides + [
            f"train.output_dir={tmp_path / str(fold)}", f"model.fold_guidance={str(fold).lower()}"])
        student = builtin_setup(config, load_split(config), None).student
        targets = student.target_velocities()
        assert isinstance(targets.teacher, ClassifierFreeGuidance)
        assert isinstance(student.velocity(), ClassifierFreeGuidance) is not fold
        assert isinstance(targets.slow_ema, ClassifierFreeGuidance) is not fold
        assert targets.teacher_whole_jump is fold  # the folded student's EMAs start unguided
        result = run_training(config, progress=False)
        # a two-pass student samples (at each step count's calibrated scale) guided; a folded one plain
        deployed = for_steps(deployed_velocity(load_model(result.model_dir)), 3)
        assert isinstance(deployed, ClassifierFreeGuidance) is not fold
    with pytest.raises(ConfigError, match="fold_guidance"):
        load_config(resolve_config_path("distill"), ["model.fold_guidance=true"])  # no guidance scale to fold
