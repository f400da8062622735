"""The one training loop, on Hugging Face Accelerate, for from-scratch flow matching and SCFM distillation.

Every random draw of step ``k`` (batch indices, noise, jumps, label dropout) comes from a generator seeded by
``(seed, k, rank)``, so a resumed run reproduces the uninterrupted one exactly on the CPU, and ranks draw
different batches while their weights stay in sync through DDP.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config import Config, save_config
from ..core.jumps import sample_jumps
from ..core.targets import TargetVelocities, scfm_loss, scfm_targets
from .checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_name,
    write_json_atomic,
)
from .setup import TrainingSetup


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of all random draws of one step on one process."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def learning_rate(config: Config, step: int) -> float:
    """Warm-up then constant or cosine decay; a pure function of the step (nothing to checkpoint)."""
    optim = config.optim
    if optim.warmup_steps and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.schedule == "cosine":
        span = max(1, config.train.steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return optim.lr


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path  # the deployable model (best evaluated student if evaluation ran, else the final one)
    state: TrainerState


def _target_velocities(setup: TrainingSetup) -> TargetVelocities:
    raw = setup.student.target_velocities()
    wrap = setup.student.wrap
    return TargetVelocities(
        teacher=wrap(raw.teacher) if raw.teacher is not None else None,
        fast_ema=wrap(raw.fast_ema),
        slow_ema=wrap(raw.slow_ema),
    )


def train(config: Config, setup: TrainingSetup, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run ``config.train.steps`` optimiser steps of the SCFM objective (plain flow matching for FLOW rows)."""
    run_dir = Path(config.train.output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        log_with=config.train.tracker or None,
        project_dir=str(run_dir),
        # Accelerate sets up the gloo process group of a CPU-only multi-process launch (torchrun, accelerate
        # launch --multi_gpu) only when told cpu=True; without it every process would train alone as "main"
        cpu=launched > 1 and not torch.accelerator.is_available(),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if launched > 1 and world != launched:
        raise RuntimeError(f"{launched} processes were launched but Accelerate runs {world}: they would not "
                           "train together; check the launcher and the device set-up")
    if config.train.batch_size % world:
        raise ValueError(f"train.batch_size ({config.train.batch_size}) must be divisible by the {world} processes")
    local_batch = config.train.batch_size // world
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if config.train.tracker:
        accelerator.init_trackers("shortcutfm")

    student = setup.student
    params = list(student.trainable_tensors().values())
    optimizer = torch.optim.AdamW(
        params, lr=config.optim.lr, betas=config.optim.betas, weight_decay=config.optim.weight_decay
    )
    state = TrainerState()
    if resume:
        found = latest_checkpoint(run_dir)
        if found is None:
            accelerator.print(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        else:
            loaded = load_checkpoint(found)
            student.load_state_dict(loaded.student)
            student.emas.load_state_dict(loaded.ema)
            optimizer.load_state_dict(loaded.optimizer)
            state = loaded.trainer_state
            accelerator.print(f"resumed from {found} (step {state.step})")
    module, optimizer = accelerator.prepare(student.module, optimizer)
    student_velocity = student.wrap(module)
    targets_from = _target_velocities(setup)

    bar = tqdm(
        total=config.train.steps, initial=state.step, disable=not (progress and accelerator.is_main_process),
        desc=f"{config.train.mode}", dynamic_ncols=True,
    )
    started, logged_loss = time.perf_counter(), []
    for step in range(state.step + 1, config.train.steps + 1):
        generator = step_generator(config.train.seed, step, rank)
        indices = torch.randint(len(setup.data), (local_batch,), generator=generator)
        x0, cond = setup.data.get(indices)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        jumps = sample_jumps(
            local_batch, config.jumps, generator, num_tokens=setup.num_tokens, allow_teacher=setup.allow_teacher
        )
        cond = setup.training_cond(cond, generator)
        device = accelerator.device
        x0, noise = x0.to(device), noise.to(device)
        cond = {k: v.to(device) for k, v in cond.items()}
        batch = scfm_targets(x0, noise, jumps, targets_from, cond)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        with accelerator.autocast():
            prediction = student_velocity(batch.x, batch.sigma, **cond)
        result = scfm_loss(prediction, batch)
        accelerator.backward(result.loss)
        if config.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        student.emas.update(step, student.trainable_tensors())
        state.step = step

        logged_loss.append(result.loss.item())
        if step % config.train.log_every == 0 or step == config.train.steps:
            mean_loss = sum(logged_loss) / len(logged_loss)
            logged_loss.clear()
            bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{learning_rate(config, step):.2g}")
            accelerator.log({"loss": mean_loss, **{f"loss/{k}": v for k, v in result.per_mode.items()}}, step=step)
        bar.update(1)

        if setup.evaluate is not None and config.eval.every and (step % config.eval.every == 0 or step == config.train.steps):
            _evaluate_and_keep_best(accelerator, setup, state, run_dir, bar)
        if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) or step == config.train.steps:
            _checkpoint(accelerator, config, setup, optimizer, state, run_dir)
    bar.close()

    model_dir = run_dir / "model"
    if accelerator.is_main_process:
        final_source = "ema" if config.train.mode == "pretrain" else "student"
        setup.export(run_dir / "final", final_source)
        best = run_dir / "best"
        chosen = best if best.is_dir() else run_dir / "final"
        _replace_dir(chosen, model_dir)
        write_json_atomic(run_dir / "trainer_state.json", state.__dict__)
        accelerator.print(
            f"done: {state.step} steps in {time.perf_counter() - started:.0f} s; model in {model_dir}"
            + (f" (best {state.history[-1]['metric']} = {state.best_metric:.4g} at step {state.best_step})" if state.best_step else "")
        )
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it also destroys the process group, which Accelerate's state (a process-wide
    # singleton) would not set up again, so a second train() in the same processes (run_demo: teacher, then
    # student) would fail under torchrun. The launcher's entry point ends it (cli.end_distributed).
    for tracker in accelerator.trackers:
        tracker.finish()
    return TrainResult(run_dir=run_dir, model_dir=model_dir, state=state)


def _replace_dir(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _evaluate_and_keep_best(accelerator, setup, state, run_dir, bar) -> None:
    if accelerator.is_main_process:
        # the unwrapped module: a DDP forward on one rank alone could wait for the other ranks
        result = setup.evaluate(setup.student.wrap(setup.student.module))
        state.history.append({"step": state.step, "metric": result.metric, "value": result.value})
        improved = state.best_metric is None or result.value < state.best_metric
        if improved:
            state.best_metric, state.best_step = result.value, state.step
            tmp = run_dir / "best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            setup.export(tmp, "student")
            shutil.rmtree(run_dir / "best", ignore_errors=True)
            tmp.rename(run_dir / "best")
        bar.write(f"step {state.step}: {result.metric} = {result.value:.4g}" + (" (best)" if improved else ""))
        accelerator.log({f"eval/{result.metric}": result.value}, step=state.step)
    accelerator.wait_for_everyone()


def _checkpoint(accelerator, config, setup, optimizer, state, run_dir) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(
            run_dir,
            step_name(state.step),
            student=setup.student.state_dict(),
            ema=setup.student.emas.state_dict(),
            optimizer=optimizer.state_dict(),
            trainer_state=state,
            extra_files={"config.yaml": (run_dir / "config.yaml").read_text()},
        )
        prune_checkpoints(run_dir, config.train.keep_checkpoints)
    accelerator.wait_for_everyone()
