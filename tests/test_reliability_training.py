"""Faults injected into training on tiny built-in models: failing writes, non-finite values, fp16 overflow, a
locked output folder, a checkpoint of another model, and the trainer properties mutation testing found untested
(gradient clipping, EMA after the optimizer step). docs/reliability.md lists each fault with its test."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from shortcutfm.atomic import WriteError
from shortcutfm.config import load_config
from shortcutfm.core.ema import StudentEMAs
from shortcutfm.folder_lock import FolderLocked
from shortcutfm.training import checkpoint as checkpoint_module
from shortcutfm.training import trainer as trainer_module
from shortcutfm.training.checkpoint import CheckpointError, list_checkpoints, step_name
from shortcutfm.training.trainer import MAX_RETRIES, NonFiniteError
from shortcutfm.workflows import resolve_config_path, run_training

TINY = ["model.width=32", "model.depth=2", "train.batch_size=64", "train.log_every=5", "data.num_toy_samples=2000"]
CHECKPOINT_FILES = ("student.safetensors", "ema.safetensors", "optimizer.safetensors")


def pretrain_config(out, steps=20, extra=()):
    return load_config(resolve_config_path("pretrain"),
                       TINY + ["data.source=checkerboard", f"train.output_dir={out}", f"train.steps={steps}", *extra])


def distill_config(out, teacher_dir, steps=20, extra=()):
    return load_config(resolve_config_path("distill"),
                       TINY + ["data.source=checkerboard", f"train.teacher={teacher_dir}", f"train.output_dir={out}",
                               f"train.steps={steps}", "eval.every=0", "jumps.self_grids=[2,4]", "jumps.teacher_grid=8",
                               "train.checkpoint_every=10", *extra])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return run_training(pretrain_config(tmp_path_factory.mktemp("teacher") / "run", steps=30), progress=False).model_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_dir):
    """The reference: a 20-step distillation that nothing disturbed."""
    return run_training(distill_config(tmp_path_factory.mktemp("full") / "run", teacher_dir), progress=False)


def assert_same_checkpoint(a, b):
    for filename in CHECKPOINT_FILES:
        left, right = load_file(str(a / filename)), load_file(str(b / filename))
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), f"{filename} differs"


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old")))


# ---------------------------------------------------------------- failing writes


@pytest.mark.parametrize("failing_write", [1, 2, 3])
def test_checkpoint_write_failing_midway_keeps_the_previous_checkpoint(tmp_path, teacher_dir, uninterrupted, monkeypatch,
                                                                       failing_write):
    """A full disk in the middle of the step-20 checkpoint (after ``failing_write - 1`` of its tensor files):
    one-line error naming the step and the good checkpoint; nothing under step-20's name; resume is exact."""
    original, calls = checkpoint_module.save_tensors, []

    def fill_disk(tensors, path):
        calls.append(path)
        if "step-00000020" in str(path) and sum("step-00000020" in str(c) for c in calls) == failing_write:
            path.write_bytes(b"\0" * 100)  # a partly written file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_tensors", fill_disk)
    config = distill_config(tmp_path / "run", teacher_dir)
    with pytest.raises(WriteError) as caught:
        run_training(config, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "step 20" in message and "No space left" in message and "step-00000010" in message
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == [step_name(10)]
    assert leftovers(run) == [] and not (run / "final").exists() and not (run / "model").exists()

    monkeypatch.setattr(checkpoint_module, "save_tensors", original)
    resumed = run_training(config, resume=True, progress=False)
    assert resumed.state.step == 20
    assert_same_checkpoint(uninterrupted.run_dir / "checkpoints" / step_name(20), run / "checkpoints" / step_name(20))


def test_export_write_failure_leaves_no_half_model_and_resume_exports(tmp_path, teacher_dir, monkeypatch):
    from shortcutfm.models import builtin

    original = builtin.save_file

    def fail(tensors, filename, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    config = distill_config(tmp_path / "run", teacher_dir, steps=10)
    monkeypatch.setattr(builtin, "save_file", fail)
    with pytest.raises(WriteError, match="exported model .*final: Input/output error"):
        run_training(config, progress=False)
    run = tmp_path / "run"
    assert not (run / "final").exists() and not (run / "model").exists() and leftovers(run) == []
    monkeypatch.setattr(builtin, "save_file", original)
    result = run_training(config, resume=True, progress=False)  # the step-10 checkpoint is whole: export again
    assert (result.model_dir / "model.safetensors").is_file() and result.state.step == 10


# ---------------------------------------------------------------- non-finite values


class _PoisonData:
    """Wraps a run's data: x0 becomes NaN on the given calls of ``get`` (the trainer calls it once per attempt)."""

    def __init__(self, data, poisoned_calls):
        self.data, self.poisoned, self.calls = data, set(poisoned_calls), 0

    def __len__(self):
        return len(self.data)

    def get(self, indices):
        self.calls += 1
        x0, cond = self.data.get(indices)
        return (torch.full_like(x0, math.nan) if self.calls in self.poisoned else x0), cond


def poison(monkeypatch, calls):
    from shortcutfm.training import builtin

    original = builtin.builtin_setup

    def poisoned_setup(*args, **kwargs):
        setup = original(*args, **kwargs)
        setup.data = _PoisonData(setup.data, calls)
        return setup

    monkeypatch.setattr("shortcutfm.workflows.builtin_setup", poisoned_setup)


def test_nan_loss_stops_the_run_naming_step_and_last_checkpoint(tmp_path, teacher_dir, monkeypatch):
    poison(monkeypatch, {13})
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as caught:
        run_training(distill_config(run, teacher_dir), progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("step 13: non-finite values (loss nan)")
    assert str(run / "checkpoints" / step_name(10)) in message
    assert [p.name for p in list_checkpoints(run)] == [step_name(10)]  # nothing written from the broken state
    assert not (run / "final").exists() and not (run / "model").exists()


def test_infinite_gradient_with_a_finite_loss_stops_the_run(tmp_path, teacher_dir, monkeypatch):
    original = trainer_module.scfm_loss
    calls = []

    def loss_with_infinite_gradient(prediction, batch):
        result = original(prediction, batch)
        calls.append(1)
        if len(calls) == 4:
            prediction.register_hook(lambda grad: grad * math.inf)
        return result

    monkeypatch.setattr(trainer_module, "scfm_loss", loss_with_infinite_gradient)
    with pytest.raises(NonFiniteError, match=r"^step 4: non-finite values \(loss [0-9.e-]+, gradient norm (inf|nan)\)"):
        run_training(distill_config(tmp_path / "run", teacher_dir), progress=False)


def test_skip_policy_redraws_the_step_and_the_weights_never_see_nan(tmp_path, teacher_dir, monkeypatch):
    poison(monkeypatch, {13, 14})  # step 13 fails twice, its third draw is good
    result = run_training(distill_config(tmp_path / "run", teacher_dir, extra=["train.on_nonfinite=skip"]),
                          progress=False)
    assert result.state.step == 20 and result.state.skipped == 2
    final = tmp_path / "run" / "checkpoints" / step_name(20)
    for filename in CHECKPOINT_FILES:
        assert all(torch.isfinite(t).all() for t in load_file(str(final / filename)).values())


def test_skip_policy_gives_up_after_max_retries(tmp_path, teacher_dir, monkeypatch):
    poison(monkeypatch, set(range(3, 3 + MAX_RETRIES + 1)))
    with pytest.raises(NonFiniteError, match=f"^step 3: .*after {MAX_RETRIES} redrawn attempts"):
        run_training(distill_config(tmp_path / "run", teacher_dir, extra=["train.on_nonfinite=skip"]), progress=False)


def test_cli_reports_a_diverged_run_in_one_line_on_stderr(tmp_path):
    command = [sys.executable, "-m", "shortcutfm.cli", "train", "pretrain", *TINY, "data.source=checkerboard",
               f"train.output_dir={tmp_path / 'run'}", "train.steps=50", "optim.lr=1e30", "optim.grad_clip=0"]
    env = {**os.environ, "COLUMNS": "60"}  # a narrow terminal must not wrap the message
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "error" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if "error" in line]  # the other lines: the closed progress bar
    assert len(lines) == 1 and lines[0].startswith("error: step ") and "non-finite values" in lines[0], done.stderr
    assert lines[0].rstrip().endswith("train.on_nonfinite=skip)")


# ---------------------------------------------------------------- fp16: the loss scaler


class _CpuScalerAccelerator(trainer_module.Accelerator):
    """Accelerate makes a loss scaler for fp16 on GPUs only; this gives the CPU run the same torch GradScaler so
    that the trainer's fp16 handling (skipped steps, scaler checkpoints) is exercised here."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)


def test_fp16_overflow_skips_without_ema_update_or_step_and_scaler_state_resumes(tmp_path, teacher_dir, monkeypatch):
    monkeypatch.setattr(trainer_module, "Accelerator", _CpuScalerAccelerator)
    original_loss, calls = trainer_module.scfm_loss, []

    def overflow_on_attempt_6(prediction, batch):  # the 6th attempt (step 6) overflows once
        calls.append(1)
        if len(calls) == 6:
            prediction.register_hook(lambda grad: grad * math.inf)
        return original_loss(prediction, batch)

    monkeypatch.setattr(trainer_module, "scfm_loss", overflow_on_attempt_6)
    updates = []
    original_update = StudentEMAs.update

    def counting_update(self, step, tensors):
        updates.append(step)
        return original_update(self, step, tensors)

    monkeypatch.setattr(StudentEMAs, "update", counting_update)
    full = run_training(distill_config(tmp_path / "full", teacher_dir), progress=False)
    assert full.state.step == 20 and full.state.skipped == 1
    assert updates == list(range(1, 21))  # one EMA update per step; none for the skipped attempt
    at_10 = json.loads((tmp_path / "full" / "checkpoints" / step_name(10) / "scaler.json").read_text())
    assert at_10["scale"] != 2.0**10  # it backed off at step 6 and grew since: a state worth restoring

    # a run killed right after its step-10 checkpoint resumes with the scaler as it was
    calls.clear()
    original_checkpoint = trainer_module._checkpoint

    def checkpoint_then_die(accelerator, config, setup, optimizer, state, run_dir):
        original_checkpoint(accelerator, config, setup, optimizer, state, run_dir)
        if state.step == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "_checkpoint", checkpoint_then_die)
    config = distill_config(tmp_path / "killed", teacher_dir)
    with pytest.raises(KeyboardInterrupt):
        run_training(config, progress=False)
    monkeypatch.setattr(trainer_module, "_checkpoint", original_checkpoint)
    calls.extend([1] * 100)  # no more injected overflow
    run_training(config, resume=True, progress=False)
    for step in (10, 20):
        a = json.loads((tmp_path / "full" / "checkpoints" / step_name(step) / "scaler.json").read_text())
        b = json.loads((tmp_path / "killed" / "checkpoints" / step_name(step) / "scaler.json").read_text())
        assert a == b, f"scaler state at step {step}"
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / step_name(20), tmp_path / "killed" / "checkpoints" / step_name(20))


# ---------------------------------------------------------------- concurrent runs

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from shortcutfm.folder_lock import folder_lock
    with folder_lock(sys.argv[1], what="training run", instead="another train.output_dir"):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_second_writer_is_refused_and_a_killed_holder_leaves_no_stuck_lock(tmp_path, teacher_dir):
    from shortcutfm.preparation import CacheLayout, CacheWriter

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match=f"another process is writing this training run \\(pid {holder.pid} "):
            run_training(distill_config(run, teacher_dir, steps=2), progress=False)
        with pytest.raises(FolderLocked, match="data cache"):
            CacheWriter(run, CacheLayout("flux", "tiny", 16, 16, 8), {"source": "test"})
        assert not (run / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = run_training(distill_config(run, teacher_dir, steps=2), progress=False)  # the kernel dropped the lock
    assert result.state.step == 2


# ---------------------------------------------------------------- resume with another model


def test_resume_with_another_model_shape_is_one_line_naming_the_mismatch(tmp_path, teacher_dir):
    run = tmp_path / "run"
    run_training(pretrain_config(run, steps=5), progress=False)
    saved = (run / "config.yaml").read_text()
    with pytest.raises(CheckpointError) as caught:
        run_training(pretrain_config(run, steps=10, extra=["model.width=48"]), resume=True, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "size mismatch for inp.weight" in message and "[32, 2]" in message
    assert f"({run / 'config.yaml'})" in message
    assert (run / "config.yaml").read_text() == saved  # the config it points at is still the run's own


def test_truncated_checkpoint_file_is_named(tmp_path):
    run = tmp_path / "run"
    run_training(pretrain_config(run, steps=5), progress=False)
    weights = run / "checkpoints" / step_name(5) / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match=f"checkpoint file {weights} is corrupt"):
        run_training(pretrain_config(run, steps=10), resume=True, progress=False)


# ---------------------------------------------------------------- trainer properties (surviving mutations)


def test_gradients_are_clipped_to_grad_clip_before_the_step(tmp_path, teacher_dir):
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        run_training(distill_config(tmp_path / "free", teacher_dir, steps=5, extra=["optim.grad_clip=0"]), progress=False)
        free, norms[:] = list(norms), []
        run_training(distill_config(tmp_path / "clipped", teacher_dir, steps=5, extra=["optim.grad_clip=1e-7"]),
                     progress=False)
    finally:
        handle.remove()
    assert min(free) > 1e-6  # unclipped gradients are larger than the clip: the test can tell
    assert len(norms) == 5 and max(norms) <= 1e-7 * (1 + 1e-4)


@pytest.mark.parametrize("mode", ["dual", "single"])
def test_emas_average_the_weights_after_each_optimizer_step(tmp_path, teacher_dir, mode):
    """After step 1: ema = decay * w_before + (1 - decay) * w_after, for each EMA."""
    seen = {}

    def before(optimizer, args, kwargs):
        seen.setdefault("before", [p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    def after(optimizer, args, kwargs):
        seen.setdefault("after", [p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    try:
        config = distill_config(tmp_path / "run", teacher_dir, steps=1, extra=[f"ema.mode={mode}", "ema.fast_decay=0.5",
                                                                             "ema.slow_decay=0.75", "optim.lr=0.01"])
        run_training(config, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    checkpoint = tmp_path / "run" / "checkpoints" / step_name(1)
    live = load_file(str(checkpoint / "student.safetensors"))
    ema = load_file(str(checkpoint / "ema.safetensors"))
    # the optimizer's parameters by name: each weight after the step is exactly one tensor of the checkpoint
    names = [next(n for n, t in live.items() if t.shape == w1.shape and torch.equal(t, w1)) for w1 in seen["after"]]
    assert len(set(names)) == len(names)
    decays = {"slow": 0.75} if mode == "single" else {"fast": 0.5, "slow": 0.75}
    moved = 0.0
    for prefix, decay in decays.items():
        for name, w0, w1 in zip(names, seen["before"], seen["after"]):
            torch.testing.assert_close(ema[f"{prefix}.{name}"], decay * w0 + (1 - decay) * w1, rtol=0, atol=1e-6)
            moved = max(moved, float((w1 - w0).abs().max()))
    assert moved > 1e-4  # the step moved the weights, so an EMA of the weights before it would not match
