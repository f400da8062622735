"""What every few-step method of the bench shares: a trainable copy of the teacher, a frozen teacher, a sampler.

A method is trained by :func:`shortcutfm.baselines.harness.fit` with the same optimizer, steps, batch size,
learning-rate search and checkpoint selection as every other. It implements:

* ``loss(x0, noise, cond, generator, step)``: the training loss of one batch (data ``x0`` in model space);
* ``after_step(step)``: bookkeeping after the optimizer step (EMAs, stage changes);
* ``sample(noise, num_steps, cond, generator)``: its own few-step sampler, one network pass per step;
* ``parameters()``, ``state_dict()``, ``load_state_dict()``: what the optimizer trains and the selection keeps.

Time convention everywhere: sigma 1 is noise, 0 is data; ``x_sigma = (1 - sigma) x0 + sigma noise`` and the
velocity is ``noise - x0`` (docs/method.md).
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from ..core.grids import sigma_grid
from ..core.samplers import euler_sample

__all__ = ["FewStepMethod", "uniform_times"]


class FewStepMethod:
    """Base: ``self.student`` starts as the teacher's weights; ``self.teacher`` is a frozen copy."""

    name = "base"
    cites = ""

    def __init__(self, teacher: nn.Module):
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.student = self.build_student(copy.deepcopy(teacher)).train().requires_grad_(True)

    def build_student(self, network: nn.Module) -> nn.Module:
        """The trainable network (default: the teacher's architecture and weights)."""
        return network

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def loss(self, x0: torch.Tensor, noise: torch.Tensor, cond: Mapping[str, torch.Tensor],
             generator: torch.Generator, step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (1-based)."""

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, num_steps: int, cond: Mapping[str, torch.Tensor],
               generator: torch.Generator) -> torch.Tensor:
        """Default: Euler on the uniform grid with the student's velocity."""
        return euler_sample(self.student, noise, sigma_grid(num_steps, 1.0), **cond).x

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.student.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.student.load_state_dict(state)


def uniform_times(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` times drawn uniformly in [0, 1)."""
    return torch.rand(batch, generator=generator)
