"""Validation of a diffusers LoRA run while it trains: sample grids of validation prompts and the selection metric.

At each validation the student samples every prompt at ``validation.steps`` (the same noise for every step count
and every validation); the grid has one row per prompt and the teacher's 32-step image last. The metric that
selects checkpoints is the *teacher-relative latent distance*: the mean squared difference between the
student's ``eval.select_steps``-step latents and the teacher's 32-step latents from the same noise and prompts
(``latent_mse_to_teacher32@N``), over the validation prompts, or over the first ``eval.num_samples`` cached
prompts when none are given (at least ``MIN_CACHED_ROWS`` rows: a smaller cache repeats its records, each with
its own noise). The teacher's latents are sampled once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Config
from ..core.samplers import euler_sample
from ..preparation.inputs import read_prompt_file
from .setup import Evaluation

TEACHER_REFERENCE_STEPS = 32
SAMPLING_BATCH = 16
#: without validation prompts, at least this many cached rows (records repeat, each with its own noise)
MIN_CACHED_ROWS = 8


@dataclass
class ValidationGrid:
    """One validation: images (rows = prompts, columns = ``labels``) in [0, 1], (rows, cols, 3, H, W)."""

    images: torch.Tensor
    prompts: list[str]
    labels: list[str]

    def tiled(self) -> torch.Tensor:
        """The grid as one (H * rows, W * cols, 3) uint8 image."""
        rows, cols, channels, height, width = self.images.shape
        tiles = self.images.permute(0, 3, 1, 4, 2).reshape(rows * height, cols * width, channels)
        return (tiles.clamp(0, 1) * 255).round().to(torch.uint8)


def validation_prompts(config: Config) -> list[str]:
    """``validation.prompts``, or the lines of ``validation.prompt_file``."""
    if config.validation.prompt_file:
        prompts = read_prompt_file(config.validation.prompt_file)
        if not prompts:
            raise ValueError(f"validation.prompt_file {config.validation.prompt_file} holds no prompts")
        return prompts
    return list(config.validation.prompts)


def load_prompt_encoder(config: Config, family):
    """The pipeline of ``model.pretrained`` without its transformer: text encoders and VAE (on the CPU)."""
    from ..sampling import absent_components

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.model.dtype]
    absent = absent_components(config.model.pretrained)
    # the transformer is not needed to encode text, except by SD3 without its T5 encoder (it reads the
    # transformer's joint_attention_dim to make the zero T5 embeddings)
    if not (family.name == "sd3" and "text_encoder_3" in absent):
        absent["transformer"] = None
    pipe = family.pipeline_class.from_pretrained(config.model.pretrained, torch_dtype=dtype, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_latents(family, vae, latents: torch.Tensor) -> torch.Tensor:
    """Cached-layout latents -> images in [0, 1] (B, 3, H, W), float32 on the CPU (the family's latent codec)."""
    return ((family.latents.decode(vae, latents) + 1) / 2).clamp(0, 1)


class LoraValidation:
    """The selection metric and the validation grids of a LoRA run (see the module docstring).

    Args:
        config: the run's config (``validation``, ``eval.select_steps``, ``eval.select_shift``, ``eval.seed``).
        student: the :class:`~shortcutfm.models.diffusers.LoraStudent`; its teacher gives the reference.
        cond: the prompts' text tensors (N, ...), as cached; ``prompts`` their text (for the grid's captions).
        latent_shape: (C, h, w) of one latent.
        decode: latents -> images in [0, 1]; None = no grids (selection only).
    """

    def __init__(self, config: Config, student, cond: dict[str, torch.Tensor], prompts: list[str],
                 latent_shape: tuple[int, ...], decode: Callable[[torch.Tensor], torch.Tensor] | None):
        from ..models.diffusers import sampling_grid

        self.config, self.student, self.prompts, self.decode = config, student, prompts, decode
        self.family = student.family
        self.cond = self.family.sampling_cond(cond)
        generator = torch.Generator().manual_seed(config.eval.seed)
        self.noise = torch.randn((len(prompts), *latent_shape), generator=generator)
        height, width = latent_shape[-2:]
        self._grid = lambda steps: sampling_grid(self.family, steps, height, width, shift=config.eval.select_shift)
        self._teacher: torch.Tensor | None = None
        self.metric = f"latent_mse_to_teacher{TEACHER_REFERENCE_STEPS}@{config.eval.select_steps}"

    @torch.no_grad()
    def sample(self, velocity, steps: int) -> torch.Tensor:
        device = next(self.student.transformer.parameters()).device
        grid = self._grid(steps)
        out = []
        for start in range(0, len(self.noise), SAMPLING_BATCH):
            rows = slice(start, start + SAMPLING_BATCH)
            cond = {k: v[rows].to(device) for k, v in self.cond.items()}
            out.append(euler_sample(velocity, self.noise[rows].to(device), grid, **cond).x.float().cpu())
        return torch.cat(out)

    def teacher(self) -> torch.Tensor:
        if self._teacher is None:
            self._teacher = self.sample(self.student.target_velocities().teacher, TEACHER_REFERENCE_STEPS)
        return self._teacher

    def evaluate(self, velocity) -> Evaluation:
        x = self.sample(velocity, self.config.eval.select_steps)
        return Evaluation(self.metric, (x - self.teacher()).square().mean().item())

    def calibrate(self, steps, scales):
        """The student's step-count calibration (:mod:`shortcutfm.core.calibration`) on these prompts and noise:
        per step count, the LoRA scale nearest 1 whose samples are within one standard error of the closest to
        the teacher's 32-step ones."""
        from ..core.calibration import StepCalibration, choose_scales

        chosen, errors = choose_scales(lambda a, n: self.sample(self.student.velocity_at(a), n), self.teacher(),
                                       steps, scales)
        return StepCalibration(chosen, self.config.eval.select_shift, TEACHER_REFERENCE_STEPS, errors)

    def grid(self, velocity) -> ValidationGrid:
        if self.decode is None:
            raise RuntimeError("this validation has no decoder (no validation prompts were given)")
        steps = self.config.validation.steps
        columns = [self.decode(self.sample(velocity, n)) for n in steps] + [self.decode(self.teacher())]
        labels = [f"student {n} step{'s' if n > 1 else ''}" for n in steps] + [f"teacher {TEACHER_REFERENCE_STEPS} steps"]
        return ValidationGrid(torch.stack(columns, dim=1), self.prompts, labels)


def lora_validation(config: Config, student, cache) -> LoraValidation:
    """Validation prompts encoded with ``model.pretrained``'s text encoders (which are then dropped; the VAE is
    kept to decode the grids), or without validation prompts the first ``eval.num_samples`` cached records."""
    layout = cache.layout
    latent_shape = tuple(cache.get(torch.arange(1))["latents"].shape[1:])
    prompts = validation_prompts(config)
    if not prompts:
        count = min(len(cache), config.eval.num_samples)
        # a tiny cache (a few-shot run) is read with several noise draws per record, so that the calibration's
        # one-standard-error rule has samples to measure noise on; bounded, so larger caches are read as they are
        rows = torch.arange(max(count, min(MIN_CACHED_ROWS, config.eval.num_samples))) % count
        record = cache.get(rows)
        record.pop("latents")
        captions = [cache.records[int(i)].caption for i in rows]
        return LoraValidation(config, student, record, captions, latent_shape, decode=None)
    pipe = load_prompt_encoder(config, student.family)
    encoding = student.family.encode_prompts(pipe, prompts, layout.max_sequence_length)
    cond = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in encoding.cond.items()}
    vae = pipe.vae.eval().requires_grad_(False)
    del pipe  # the text encoders go; the VAE stays for the grids

    def decode(latents: torch.Tensor) -> torch.Tensor:
        device = next(student.transformer.parameters()).device
        if next(vae.parameters()).device != device:
            vae.to(device)
        return decode_latents(student.family, vae, latents)

    return LoraValidation(config, student, cond, prompts, latent_shape, decode)


def calibrate_lora(config: Config, student, cache, model_dir: Path):
    """Calibrate the LoRA of a finished distillation run (``model_dir``: its deployed LoRA, loaded into ``student``
    first) on the validation prompts (or cached ones) per ``calibration.steps``, and store the result beside and in
    the LoRA file; None when the config asks for none (``calibration.steps: []``, folded guidance, pretraining).
    Every process calls it (a sharded student samples on all); the main process writes."""
    import os

    from safetensors.torch import load_file

    from ..models.diffusers.export import STUDENT_WEIGHTS, write_calibration

    settings = config.calibration
    if config.train.mode != "distill" or not settings.steps or config.model.fold_guidance:
        return None
    trained = student.state_dict()  # put back afterwards: the caller's student keeps its final weights
    weights = load_file(str(Path(model_dir) / STUDENT_WEIGHTS))
    student.load_state_dict({name.removeprefix("transformer."): tensor for name, tensor in weights.items()})
    try:
        calibration = lora_validation(config, student, cache).calibrate(settings.steps, settings.scales)
    finally:
        from .sharding import reshard

        reshard(student.transformer)  # sampling without backward leaves a sharded root all-gathered
        student.load_state_dict(trained)
    if int(os.environ.get("RANK", "0")) == 0:
        write_calibration(model_dir, calibration)
    return calibration


def save_grid(grid: ValidationGrid, path: Path) -> Path:
    """The grid as a PNG with column titles and prompt captions (matplotlib), written atomically."""
    from ..atomic import atomic_path
    from ..evaluation.report import plt

    rows, cols = grid.images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 4.0, 1.6 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(grid.images[r, c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(grid.labels[c], fontsize=8)
        axes[r][-1].text(1.06, 0.5, grid.prompts[r][:80], transform=axes[r][-1].transAxes, fontsize=7, va="center")
    fig.tight_layout()
    with atomic_path(path, what="validation grid") as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    return path


def log_grid(accelerator, grid: ValidationGrid, step: int) -> None:
    """The grid to the run's trackers: TensorBoard (``add_images``) and W&B (``wandb.Image`` with captions)."""
    tiled = grid.tiled().numpy()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": tiled[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            caption = " | ".join(grid.labels) + "\n" + "\n".join(grid.prompts)
            tracker.log({"validation": wandb.Image(tiled, caption=caption)}, step=step)
