"""What the trainer needs to know about a run, independent of the model kind (built-in or diffusers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from ..core.velocity import VelocityModel
from ..models.student import Student

if TYPE_CHECKING:
    from .validation import ValidationGrid


class BatchSource(Protocol):
    """Training examples: ``get(indices)`` returns data ``x0`` (B, ...) and per-sample conditioning."""

    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def draw_batch(data: BatchSource, indices: torch.Tensor, caption_shuffle: float,
               generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Examples ``indices``; with ``caption_shuffle`` > 0, each row's conditioning is, with that probability, the
    conditioning of another example drawn uniformly from ``data``.

    Distillation targets are the teacher's velocities at any (point, condition) pair, so pairing a point with a
    caption it was not made from is still a valid training row; with a handful of image-caption pairs it multiplies
    the pairs the student sees (at high noise a point says little about its caption)."""
    x0, cond = data.get(indices)
    if caption_shuffle == 0.0 or not cond:
        return x0, cond
    swap = torch.rand(len(indices), generator=generator) < caption_shuffle
    donors = torch.randint(len(data), (len(indices),), generator=generator)
    _, donor_cond = data.get(donors)
    shuffled = {}
    for key, value in cond.items():
        mask = swap.view(-1, *([1] * (value.ndim - 1)))
        shuffled[key] = torch.where(mask, donor_cond[key].to(value.dtype), value)
    return x0, shuffled


@dataclass
class Evaluation:
    metric: str  # e.g. "frechet_distance@3"
    value: float  # lower is better


@dataclass
class TrainingSetup:
    """Everything model-specific the generic loop in :mod:`shortcutfm.training.trainer` calls.

    * ``training_cond(cond, generator)``: per-step conditioning changes (label dropout, Flux guidance draws);
    * ``num_tokens``: latent tokens per sample, for the dynamic shift (None if unused);
    * ``allow_teacher``: False for from-scratch training (no teacher-taught rows);
    * ``evaluate(velocity)``: few-step quality of a velocity model, lower is better (None = no selection);
    * ``export(directory, velocity_source)``: write a deployable model ("student" or "ema" weights);
    * ``validate(velocity)``: a grid of validation images (None = none), saved under ``RUN/validation/`` and
      logged to the tracker every ``validation.every`` steps (0: with each evaluation) and at the end.
    """

    student: Student
    data: BatchSource
    training_cond: Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]
    num_tokens: int | None
    allow_teacher: bool
    evaluate: Callable[[VelocityModel], Evaluation] | None
    export: Callable[[Path, str], None]
    validate: Callable[[VelocityModel], ValidationGrid] | None = None
