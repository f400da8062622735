"""Training set-up for a LoRA on a diffusers model (Flux, SD3, Lumina 2) from a prepared latent cache."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..core.samplers import euler_sample
from ..models.diffusers import LoraSettings, LoraStudent, export_lora, get_family, sampling_grid
from ..preparation import LatentCache
from .setup import Evaluation, TrainingSetup

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEACHER_REFERENCE_STEPS = 32


class CachedBatches:
    """:class:`~shortcutfm.training.setup.BatchSource` over a prepared :class:`LatentCache`."""

    def __init__(self, cache: LatentCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.cache.get(indices)
        latents = record.pop("latents").float()
        return latents, record


def teacher_agreement_evaluator(config: Config, student: LoraStudent, cache: LatentCache):
    """Few-step metric for checkpoint selection without any image model: the mean squared distance between the
    student's ``eval.select_steps``-step latents and the teacher's 32-step latents from the same noise and
    prompts (the first ``eval.num_samples`` cached records, at most 8)."""
    family = student.family
    count = min(len(cache), config.eval.num_samples, 8)
    record = cache.get(torch.arange(count))
    latents = record.pop("latents")
    cond = family.sampling_cond(record)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(config.eval.seed))
    height, width = latents.shape[-2:]
    reference: dict[str, torch.Tensor] = {}

    def sample(velocity, steps: int) -> torch.Tensor:
        device = next(student.transformer.parameters()).device
        grid = sampling_grid(family, steps, height, width)
        moved = {k: v.to(device) for k, v in cond.items()}
        return euler_sample(velocity, noise.to(device), grid, **moved).x.float().cpu()

    def evaluate(velocity) -> Evaluation:
        if "teacher" not in reference:
            reference["teacher"] = sample(student.wrap(student.target_velocities().teacher), TEACHER_REFERENCE_STEPS)
        x = sample(velocity, config.eval.select_steps)
        return Evaluation(f"latent_mse_to_teacher{TEACHER_REFERENCE_STEPS}@{config.eval.select_steps}",
                          (x - reference["teacher"]).square().mean().item())

    return evaluate


def diffusers_setup(config: Config) -> TrainingSetup:
    """LoRA student on the frozen pretrained transformer, trained from the cache in ``data.source``."""
    family = get_family(config.model.kind)
    if not config.model.pretrained:
        raise ValueError(f"model.pretrained must name the {family.name} pipeline (local path or hub id)")
    cache = LatentCache(Path(config.data.source))
    if cache.layout.family != family.name:
        raise ValueError(
            f"data.source {config.data.source} was prepared for {cache.layout.family!r}, but model.kind is "
            f"{family.name!r}; prepare the data with the same model"
        )
    student = LoraStudent.from_pretrained(
        family,
        config.model.pretrained,
        lora=LoraSettings(rank=config.lora.rank, alpha=config.lora.alpha, target_modules=config.lora.target_modules or None),
        schedule=config.ema,
        dtype=DTYPES[config.model.dtype],
        uncond=cache.uncond,
        guidance_scale=config.model.guidance_scale,
        gradient_checkpointing=config.model.gradient_checkpointing,
    )
    height, width = cache.get(torch.arange(1))["latents"].shape[-2:]

    def export(directory: Path, source: str) -> None:
        export_lora(student, directory, include_ema=True)

    evaluate = teacher_agreement_evaluator(config, student, cache) if config.eval.every else None
    return TrainingSetup(
        student=student,
        data=CachedBatches(cache),
        training_cond=student.training_cond,
        num_tokens=family.num_image_tokens(height, width),
        allow_teacher=True,
        evaluate=evaluate,
        export=export,
    )
