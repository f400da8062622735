"""The one training loop, on Hugging Face Accelerate, for from-scratch flow matching and SCFM distillation.

Every random draw of step ``k`` (batch indices, noise, jumps, label dropout) comes from a generator seeded by
``(seed, k, rank)``, so a resumed run reproduces the uninterrupted one exactly on the CPU, and ranks draw
different batches while their weights stay in sync through DDP.

Faults are handled so that nothing is lost (docs/reliability.md):

* the output folder is locked while the run writes it (:mod:`shortcutfm.folder_lock`);
* a non-finite loss or gradient norm stops the run before the optimizer or the EMAs see it, with a one-line
  :class:`NonFiniteError` naming the step and the last good checkpoint (``train.on_nonfinite=skip``: the step
  is redrawn instead, up to ``MAX_RETRIES`` times in a row);
* with fp16, a step the loss scaler skips for overflow updates neither the EMAs nor the step count (the step
  is redone at the lower scale), and the scaler's state is checkpointed;
* checkpoints and exports are written atomically; a failed write stops the run with a one-line
  :class:`~shortcutfm.atomic.WriteError` and leaves the previous checkpoint usable.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..atomic import WriteError, atomic_path, copy_dir_atomic, write_json_atomic
from ..config import Config, save_config
from ..core.jumps import sample_jumps
from ..core.targets import scfm_loss, scfm_targets
from ..errors import ExistingRunError, NonFiniteError
from ..folder_lock import FolderLocked, folder_lock
from .checkpoint import (
    CheckpointError,
    EvalRecord,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_name,
)
from .setup import TrainingSetup
from .sharding import full_optimizer_state, full_tensors, like, shard_optimizer_state

__all__ = ["train", "TrainResult", "NonFiniteError", "learning_rate", "step_generator", "MAX_RETRIES"]

MAX_RETRIES = 32
"""Consecutive redone attempts of one step (fp16 overflow, or non-finite values with on_nonfinite=skip) before
the run stops: 32 halvings take fp16's loss scale from 65536 far below 1."""


def step_generator(seed: int, step: int, rank: int, attempt: int = 0) -> torch.Generator:
    """The generator of all random draws of one step on one process (``attempt`` > 0: a redone step)."""
    base = (seed * 1_000_003 + step) * 1_009 + rank
    return torch.Generator().manual_seed(base + attempt * 2**40 if attempt else base)


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


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _check_tracker(tracker: str) -> None:
    """A named tracker whose package is missing is an error (Accelerate would only warn and log nothing)."""
    import importlib.util

    if tracker and not any(importlib.util.find_spec(name) for name in TRACKER_PACKAGES[tracker]):
        raise ValueError(f"train.tracker={tracker!r}: the {TRACKER_PACKAGES[tracker][0]} package is not installed; "
                         f"pip install {TRACKER_PACKAGES[tracker][0]}, or set train.tracker=''")


def _build_accelerator(config: Config, run_dir: Path) -> Accelerator:
    _check_tracker(config.train.tracker)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        log_with=config.train.tracker or None,
        project_dir=str(run_dir),
        # Accelerate sets up the gloo process group of a CPU-only multi-process launch (torchrun, accelerate
        # launch --multi_gpu) only when told cpu=True; without it every process would train alone as "main"
        cpu=launched > 1 and not torch.accelerator.is_available(),
    )
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but Accelerate runs {accelerator.num_processes}: "
                           "they would not train together; check the launcher and the device set-up")
    shares = accelerator.num_processes * config.train.gradient_accumulation
    if config.train.batch_size % shares:
        raise ValueError(f"train.batch_size ({config.train.batch_size}) must be divisible by the "
                         f"{accelerator.num_processes} processes x train.gradient_accumulation "
                         f"({config.train.gradient_accumulation})")
    return accelerator


def _all_ranks(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on every process (one tiny all-reduce when there are several)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() == 0)


def _on_main_process(accelerator: Accelerator, action, errors: type[Exception] | tuple, elsewhere: Exception) -> None:
    """Run ``action()`` on the main process only. If it raises one of ``errors``, every rank raises too (the main
    process its own error, the others ``elsewhere``), so no rank waits forever for the main one."""
    failure = None
    if accelerator.is_main_process:
        try:
            action()
        except errors as error:
            failure = error
    if not _all_ranks(accelerator, failure is None):
        raise failure or elsewhere


def _lock_run_dir(accelerator: Accelerator, stack: ExitStack, run_dir: Path) -> None:
    """The main process locks the output folder for the whole run; every rank stops if it is held elsewhere."""
    _on_main_process(
        accelerator, lambda: stack.enter_context(folder_lock(run_dir, what="training run", instead="another train.output_dir")),
        FolderLocked, FolderLocked(f"{run_dir} is in use by another process (see the main process's message)"))


def _resume(accelerator, run_dir: Path, student, optimizer, params) -> TrainerState:
    found = latest_checkpoint(run_dir)
    if found is None:
        accelerator.print(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        return TrainerState()
    loaded = load_checkpoint(found)
    try:
        student.load_state_dict(loaded.student)
        # sharded (FSDP2) runs: whole tensors laid out as the shards they load into (a no-op otherwise)
        shadows = {f"{prefix}.{name}": tensor for prefix, ema in (("slow", student.emas.slow), ("fast", student.emas.fast))
                   for name, tensor in ema.shadow.items()}
        student.emas.load_state_dict({key: like(shadows[key], value) if key in shadows else value
                                      for key, value in loaded.ema.items()})
        optimizer.load_state_dict(shard_optimizer_state(loaded.optimizer, params))
    except (RuntimeError, KeyError, ValueError) as error:  # other shapes or names: the config changed
        first_line = str(error).strip().splitlines()
        detail = next((line.strip() for line in first_line[1:] if line.strip()), first_line[0] if first_line else "")
        raise CheckpointError(
            f"checkpoint {found} does not fit this config's model ({detail}); resume with the config the run "
            f"was started with ({run_dir / 'config.yaml'}), or start a new train.output_dir"
        ) from None
    if loaded.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(loaded.scaler)
    accelerator.print(f"resumed from {found} (step {loaded.trainer_state.step})")
    return loaded.trainer_state


def _last_good(run_dir: Path) -> str:
    found = latest_checkpoint(run_dir)
    return f"the last good checkpoint is {found}" if found else "no checkpoint was written yet"


def _nonfinite_message(step: int, loss: float, norm: float | None, run_dir: Path, retries: int) -> str:
    what = f"loss {loss:.4g}" + ("" if norm is None else f", gradient norm {float(norm):.4g}")
    tried = f" after {retries} redrawn attempts" if retries else ""
    return (f"step {step}: non-finite values ({what}){tried}; the run stopped before updating the weights and "
            f"wrote nothing; {_last_good(run_dir)}. Lower optim.lr or check the data, then run again with --resume "
            "(or set train.on_nonfinite=skip)")


RUN_OUTPUTS = ("checkpoints", "best", "final", "model", "trainer_state.json")


def _existing_run(run_dir: Path) -> str | None:
    """What of another run ``run_dir`` holds, or None."""
    found = latest_checkpoint(run_dir)
    if found is not None:
        return f"checkpoints up to {found.name}"
    present = [name for name in RUN_OUTPUTS[1:] if (run_dir / name).exists()]
    return ", ".join(present) or None


def _clear_for_fresh_run(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run never mixes with (nor prunes away) another run's checkpoints: refuse, or delete with overwrite."""
    if resume:
        return
    existing = _existing_run(run_dir)
    if existing is None:
        return
    if not overwrite:
        raise ExistingRunError(f"{run_dir} holds another run ({existing}); continue it with --resume, replace it "
                               "with --overwrite, or choose another train.output_dir")
    for name in RUN_OUTPUTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def train(config: Config, setup: TrainingSetup, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """Run ``config.train.steps`` optimiser steps of the SCFM objective (plain flow matching for FLOW rows).

    ``resume``: continue from the latest checkpoint in ``train.output_dir``. A fresh run into a folder that holds
    another run is refused (:class:`~shortcutfm.errors.ExistingRunError`) unless ``overwrite`` deletes it."""
    run_dir = Path(config.train.output_dir)
    accelerator = _build_accelerator(config, run_dir)
    with ExitStack() as stack:
        _lock_run_dir(accelerator, stack, run_dir)
        _on_main_process(accelerator, lambda: _clear_for_fresh_run(run_dir, resume, overwrite), ExistingRunError,
                         ExistingRunError(f"{run_dir} holds another run (see the main process's message)"))
        return _train_locked(config, setup, accelerator, run_dir, resume=resume, progress=progress)


def _train_locked(config: Config, setup: TrainingSetup, accelerator: Accelerator, run_dir: Path, *, resume: bool,
                  progress: bool) -> TrainResult:
    student = setup.student
    if config.train.shard:  # FSDP2: shard before the optimizer sees the parameters (they become DTensors)
        if not hasattr(student, "shard"):
            raise ValueError("train.shard is for diffusers LoRA runs")
        if accelerator.num_processes < 2:
            raise ValueError("train.shard needs several processes: launch with torchrun or accelerate launch")
        student.shard(accelerator.device)
    params = list(student.trainable_tensors().values())
    optimizer = build_optimizer(config, params)
    state = _resume(accelerator, run_dir, student, optimizer, params) if resume else TrainerState()
    if accelerator.is_main_process:  # after the resume check: a refused resume keeps the run's own config.yaml
        save_config(config, run_dir / "config.yaml")
    if config.train.tracker:
        accelerator.init_trackers("shortcutfm")
    if config.train.shard:
        module, optimizer = student.module, accelerator.prepare(optimizer)
    else:
        module, optimizer = accelerator.prepare(student.module, optimizer)
    student_velocity = student.velocity(module)
    targets_from = student.target_velocities()

    bar = tqdm(
        total=config.train.steps, initial=state.step, disable=not (progress and accelerator.is_main_process),
        desc=f"{config.train.mode}", dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        _loop(config, setup, accelerator, run_dir, state, optimizer, module, student_velocity, targets_from, params, bar)
    finally:
        bar.close()
    return _finish(config, setup, accelerator, run_dir, state, started)


def _finish(config, setup, accelerator, run_dir: Path, state: TrainerState, started: float) -> TrainResult:
    """Export the final model, deploy the best (or final) one, write the trainer state; end the trackers."""
    model_dir = run_dir / "model"
    final_source = "ema" if config.train.mode == "pretrain" else "student"
    _export(accelerator, setup, run_dir / "final", final_source, config.train.shard, "exported model")
    if accelerator.is_main_process:
        best = run_dir / "best"
        copy_dir_atomic(best if best.is_dir() else run_dir / "final", model_dir, what="deployed model")
        write_json_atomic(run_dir / "trainer_state.json", asdict(state))
        accelerator.print(
            f"done: {state.step} steps in {time.perf_counter() - started:.0f} s; model in {model_dir}"
            + (f" (best {state.selection_metric} = {state.best_metric:.4g} at step {state.best_step})" if state.best_step else "")
        )
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it also destroys the process group, which Accelerate's state (a process-wide
    # singleton) would not set up again, so a second train() in the same processes (run_demo: teacher, then
    # student) would fail under torchrun. The launcher's entry point ends it (cli.end_distributed).
    for tracker in accelerator.trackers:
        tracker.finish()
    return TrainResult(run_dir=run_dir, model_dir=model_dir, state=state)


def _micro_batches(local_batch: int, micro: int) -> list[slice]:
    size = local_batch // micro
    return [slice(k * size, (k + 1) * size) for k in range(micro)]


def _loop(config, setup, accelerator, run_dir, state, optimizer, module, student_velocity, targets_from, params,
          bar) -> None:
    """Optimizer steps from ``state.step + 1`` to ``train.steps``, with evaluations and checkpoints."""
    student, rank = setup.student, accelerator.process_index
    local_batch = config.train.batch_size // accelerator.num_processes
    micro = config.train.gradient_accumulation
    scaler = accelerator.scaler  # fp16 on a GPU: the loss scaler Accelerate made (None otherwise)
    max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
    logged_loss = []
    step, attempt = state.step + 1, 0
    last_loss, last_norm = math.nan, None  # of the latest attempt, for the message if a step keeps failing
    while step <= config.train.steps:
        if attempt > MAX_RETRIES:
            raise NonFiniteError(_nonfinite_message(step, last_loss, last_norm, run_dir, MAX_RETRIES))
        generator = step_generator(config.train.seed, step, rank, attempt)
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

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        # gradient accumulation: the whole batch was drawn above, so micro-batches only split the work
        losses, last_norm, finite = [], None, True
        for chunk, rows in enumerate(_micro_batches(local_batch, micro)):
            chunk_cond = {k: v[rows] for k, v in cond.items()}
            batch = scfm_targets(x0[rows], noise[rows], jumps.rows(rows), targets_from, chunk_cond)
            with accelerator.autocast():
                prediction = student_velocity(batch.x, batch.sigma, **chunk_cond)
            result = scfm_loss(prediction, batch)
            losses.append(result.loss.item())
            finite = _all_ranks(accelerator, math.isfinite(losses[-1]))  # checked before backward: ranks agree first
            if not finite:
                break
            # DDP all-reduces gradients on the last micro-batch only
            with contextlib.nullcontext() if chunk == micro - 1 else accelerator.no_sync(module):
                accelerator.backward(result.loss / micro)
        last_loss = losses[-1] if not finite else sum(losses) / len(losses)
        if finite:
            # clip_grad_norm_ also unscales fp16 gradients; max_norm=inf when clipping is off (the norm is still read)
            last_norm = float(accelerator.clip_grad_norm_(params, max_norm))
            # gradients are all-reduced, so every rank agrees; with fp16 the scaler handles an overflow below
            finite = math.isfinite(last_norm) or scaler is not None
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if config.train.on_nonfinite == "stop":
                raise NonFiniteError(_nonfinite_message(step, last_loss, last_norm, run_dir, attempt))
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not finite or accelerator.optimizer_step_was_skipped:  # redo the step (fp16: at the lowered scale)
            attempt += 1
            state.skipped += 1
            continue
        student.emas.update(step, student.trainable_tensors())
        state.step, attempt = step, 0

        logged_loss.append(last_loss)
        if step % config.train.log_every == 0 or step == config.train.steps:
            mean_loss = sum(logged_loss) / len(logged_loss)
            logged_loss.clear()
            bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{learning_rate(config, step):.2g}")
            accelerator.log({"loss": mean_loss, **{f"loss/{k}": v for k, v in result.per_mode.items()}}, step=step)
        bar.update(1)

        if setup.evaluate is not None and config.eval.every and (step % config.eval.every == 0 or step == config.train.steps):
            _evaluate_and_keep_best(accelerator, setup, state, run_dir, bar, config.train.shard)
        if setup.validate is not None and _validation_due(config, step):
            _validate(accelerator, setup, state, run_dir, bar, config.train.shard)
        if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) or step == config.train.steps:
            _checkpoint(accelerator, config, setup, optimizer, state, run_dir)
        step += 1


def build_optimizer(config: Config, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """AdamW (torch) or bitsandbytes' 8-bit AdamW (``optim.optimizer``), with the config's rate, betas and decay."""
    optim = config.optim
    if optim.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError('optim.optimizer=adamw8bit needs bitsandbytes: pip install "shortcutfm[quant]"') from None
        return bnb.optim.AdamW8bit(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)


def _validation_due(config: Config, step: int) -> bool:
    every = config.validation.every or config.eval.every
    return step == config.train.steps or bool(every and step % every == 0)


def _runs_here(accelerator, sharded: bool) -> bool:
    """Whether this process evaluates, validates and exports: the main one, or every one of a sharded run (a
    forward of a sharded model is a collective; each process gets the same result, the main one writes it)."""
    return accelerator.is_main_process or sharded


def _export(accelerator, setup, target: Path, source: str, sharded: bool, what: str) -> None:
    """``setup.export`` into ``target`` atomically on the main process; in a sharded run the other processes take
    part in the gathers and write into a throwaway folder."""
    if accelerator.is_main_process:
        with atomic_path(target, directory=True, what=what) as temporary:
            setup.export(temporary, source)
    elif sharded:
        with tempfile.TemporaryDirectory() as throwaway:
            setup.export(Path(throwaway), source)


def _validate(accelerator, setup, state, run_dir, bar, sharded: bool = False) -> None:
    """A grid of validation images: ``RUN/validation/step-XXXXXX.png`` and the tracker (written by the main process)."""
    from .validation import log_grid, save_grid

    if _runs_here(accelerator, sharded):
        grid = setup.validate(setup.student.velocity())
        if accelerator.is_main_process:
            path = save_grid(grid, run_dir / "validation" / f"step-{state.step:06d}.png")
            log_grid(accelerator, grid, state.step)
            bar.write(f"step {state.step}: validation grid {path}")
    accelerator.wait_for_everyone()


def _evaluate_and_keep_best(accelerator, setup, state, run_dir, bar, sharded: bool = False) -> None:
    if _runs_here(accelerator, sharded):
        # the unwrapped module: a DDP forward on one rank alone could wait for the other ranks
        result = setup.evaluate(setup.student.velocity())
        state.history.append(EvalRecord(state.step, result.metric, result.value))
        improved = state.best_metric is None or result.value < state.best_metric
        if improved:
            state.best_metric, state.best_step = result.value, state.step
            _export(accelerator, setup, run_dir / "best", "student", sharded, "best model")
        if accelerator.is_main_process:
            bar.write(f"step {state.step}: {result.metric} = {result.value:.4g}" + (" (best)" if improved else ""))
            accelerator.log({f"eval/{result.metric}": result.value}, step=state.step)
    accelerator.wait_for_everyone()


def _checkpoint(accelerator, config, setup, optimizer, state, run_dir) -> None:
    accelerator.wait_for_everyone()
    # whole tensors on every process (a collective when sharded; LoRA-sized), written by the main one
    student_state = setup.student.state_dict()
    ema_state = full_tensors(setup.student.emas.state_dict())
    optimizer_state = full_optimizer_state(optimizer.state_dict())

    def write() -> None:
        try:
            save_checkpoint(
                run_dir,
                step_name(state.step),
                student=student_state,
                ema=ema_state,
                optimizer=optimizer_state,
                trainer_state=state,
                scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                extra_files={"config.yaml": (run_dir / "config.yaml").read_text()},
            )
        except WriteError as error:
            raise WriteError(error.errno, f"step {state.step}: {error.strerror}; {_last_good(run_dir)} "
                                          "(resume from it with --resume)") from error
        prune_checkpoints(run_dir, config.train.keep_checkpoints)

    _on_main_process(accelerator, write, WriteError,
                     WriteError(0, f"step {state.step}: the main process could not write the checkpoint"))
    accelerator.wait_for_everyone()
