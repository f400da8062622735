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
