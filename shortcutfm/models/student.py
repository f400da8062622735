"""The student abstraction the trainer drives: a trainable velocity model plus its teacher and EMAs.

Two implementations exist: :class:`FullStudent` (full-parameter, any ``nn.Module``; EMAs are shadow tensors
evaluated with ``torch.func.functional_call``) and the LoRA student for diffusers models
(:mod:`shortcutfm.models.diffusers.lora_student`; EMAs are non-trainable adapters). Neither ever copies EMA or
teacher weights into the live model.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Protocol

import torch
from torch import nn
from torch.func import functional_call

from ..core.ema import EMASchedule, StudentEMAs
from ..core.targets import TargetVelocities
from ..core.velocity import VelocityModel

Wrap = Callable[[VelocityModel], VelocityModel]


def no_wrap(model: VelocityModel) -> VelocityModel:
    return model


class Student(Protocol):
    """What the trainer needs from a student.

    * ``module``: the trainable ``nn.Module`` (velocity contract) that ``accelerate.prepare`` wraps;
    * ``emas``: the student's EMAs, updated by the trainer after each optimiser step;
    * ``trainable_tensors()``: the live trainable tensors by name (what the EMAs average);
    * ``velocity(module)``: the student's own prediction through ``module`` (default: ``self.module``; the trainer
      passes the accelerate-wrapped one), with the student's guidance applied;
    * ``target_velocities()``: teacher / fast-EMA / slow-EMA callables, with the same guidance applied;
    * ``ema_velocity()``: the slow EMA as a guided velocity model (for evaluation);

    Guidance (e.g. classifier-free guidance, docs/method.md "Guidance") is the student's business: every velocity
    it hands out is already guided, so no caller can forget it.
    * ``state_dict()`` / ``load_state_dict()``: the student's trainable weights (for checkpoints).
    """

    module: nn.Module
    emas: StudentEMAs

    def trainable_tensors(self) -> dict[str, torch.Tensor]: ...

    def velocity(self, module: nn.Module | None = None) -> VelocityModel: ...

    def target_velocities(self) -> TargetVelocities: ...

    def ema_velocity(self) -> VelocityModel: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


class _ShadowVelocity(nn.Module):
    """Evaluates ``module`` with shadow tensors in place of its parameters, without touching the module."""

    def __init__(self, module: nn.Module, shadow: Mapping[str, torch.Tensor]):
        super().__init__()
        self._module = [module]  # a list, so the module is not registered (and not saved) twice
        self.shadow = shadow

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return functional_call(self._module[0], dict(self.shadow), (x, sigma), cond, strict=False)


class FullStudent:
    """Full-parameter student: a trainable copy of the teacher, EMAs as shadow copies of every parameter.

    Args:
        model: the velocity model to train. For distillation it is the teacher's architecture loaded with the
            teacher's weights; a frozen copy becomes the teacher.
        schedule: EMA decays and mode.
        teacher: if False (from-scratch training) no teacher copy is kept.
        guidance: applied to every velocity the student hands out (e.g. classifier-free guidance).
        fold_guidance: apply ``guidance`` to the teacher only: the student (and its EMAs) learn the guided teacher
            in one plain pass; teacher-taught targets then take every sub-step with the guided teacher.
    """

    def __init__(self, model: nn.Module, schedule: EMASchedule, *, teacher: bool = True, guidance: Wrap = no_wrap,
                 fold_guidance: bool = False):
        self.module = model
        self._guide_teacher = guidance
        self._guide = no_wrap if fold_guidance else guidance
        self.fold_guidance = fold_guidance
        self.teacher = None
        if teacher:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        params = self.trainable_tensors()
        slow = {n: p.detach().clone().float() for n, p in params.items()}
        fast = {n: p.detach().clone().float() for n, p in params.items()} if schedule.mode == "dual" else None
        self.emas = StudentEMAs(schedule, slow_shadow=slow, fast_shadow=fast)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def _shadow_velocity(self, shadow: Mapping[str, torch.Tensor]) -> VelocityModel:
        return self._guide(_ShadowVelocity(self.module, shadow))

    def velocity(self, module: nn.Module | None = None) -> VelocityModel:
        """The student's own guided prediction through ``module`` (default: the live module)."""
        return self._guide(self.module if module is None else module)

    @torch.no_grad()
    def _follow_module_device(self) -> None:
        """Move the teacher and the EMA shadows to the live module's device.

        The trainer builds the student on the CPU and ``accelerate.prepare`` then moves ``module`` (only); the
        teacher copy and the shadows must follow it, as the LoRA student's adapters do by living in the module.
        Shadow entries are replaced in the EMA's own dict, so velocities made earlier see the moved tensors.
        """
        device = next(self.module.parameters()).device
        if self.teacher is not None:
            self.teacher.to(device)
        for ema in self.emas.averages():
            for name, tensor in ema.shadow.items():
                if tensor.device != device:
                    ema.shadow[name] = tensor.to(device)

    def target_velocities(self) -> TargetVelocities:
        """Guided teacher / fast-EMA / slow-EMA velocities, on the live module's device (call after moving it)."""
        self._follow_module_device()
        return TargetVelocities(
            teacher=self._guide_teacher(self.teacher) if self.teacher is not None else None,
            fast_ema=self._shadow_velocity(self.emas.fast.shadow),
            slow_ema=self._shadow_velocity(self.emas.slow.shadow),
            teacher_whole_jump=self.fold_guidance,
        )

    def ema_velocity(self) -> VelocityModel:
        self._follow_module_device()
        return self._shadow_velocity(self.emas.slow.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
