"""``progressive``: progressive distillation (Salimans & Ho, ICLR 2022, Algorithm 2) for flow models.

The step count halves in stages: a student of ``N`` steps learns, at the points of its own uniform grid, to
reach in one Euler step where two Euler steps of its teacher (the previous stage, ``2N`` steps) land:

    x_mid = x_t + (t_mid - t) v_T(x_t, t),   x_end = x_mid + (t' - t_mid) v_T(x_mid, t_mid),
    target velocity  v* = (x_end - x_t) / (t' - t)          (t > t_mid > t', t_mid = (t + t') / 2)

(the velocity form of the paper's eq. 8 target). The first teacher is the pretrained model as a
``start_steps``-step sampler; the stages ``start_steps / 2, ..., 1`` share the optimizer steps equally, and each
stage's student becomes the next stage's teacher.
"""

from __future__ import annotations

import copy
import math

import torch

from ..core.grids import sigma_grid
from ..core.velocity import expand_like, interpolate
from .base import FewStepMethod

__all__ = ["ProgressiveDistillation", "two_step_target"]


@torch.no_grad()
def two_step_target(teacher, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, **cond) -> torch.Tensor:
    """The velocity whose single Euler step from ``(x, t)`` to ``t_next`` equals two teacher Euler steps."""
    t_mid = (t + t_next) / 2
    x_mid = x + expand_like(t_mid - t, x) * teacher(x, t, **cond)
    x_end = x_mid + expand_like(t_next - t_mid, x) * teacher(x_mid, t_mid, **cond)
    return (x_end - x) / expand_like(t_next - t, x)


class ProgressiveDistillation(FewStepMethod):
    name = "progressive"
    cites = "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models, eq. 8 / Alg. 2"

    def __init__(self, teacher, total_steps: int, start_steps: int = 32):
        super().__init__(teacher)
        self.stages = int(math.log2(start_steps))  # start/2, ..., 1 student steps
        self.steps_per_stage = max(1, total_steps // self.stages)
        self.start_steps = start_steps
        self.stage = 1
        self.stage_teacher = self.teacher

    @property
    def student_steps(self) -> int:
        return self.start_steps // 2**self.stage

    def loss(self, x0, noise, cond, generator, step):
        grid = sigma_grid(self.student_steps, 1.0, dtype=x0.dtype)
        index = torch.randint(self.student_steps, (len(x0),), generator=generator)
        t, t_next = grid[index], grid[index + 1]
        x = interpolate(x0, noise, t)
        target = two_step_target(self.stage_teacher, x, t, t_next, **cond)
        return (self.student(x, t, **cond) - target).pow(2).mean()

    def after_step(self, step):
        if step % self.steps_per_stage == 0 and self.stage < self.stages:
            self.stage_teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
            self.stage += 1

