"""The SCFM regression target and loss (docs/method.md, "The target").

For a shortcut row with jump points ``s_0 > s_1 > ... > s_T`` (``T = t_skip``), starting from
``x_0 = (1 - s_0) x0 + s_0 noise``, the first ``T/2`` Euler sub-steps are taken with ``F`` (teacher or fast EMA)
and the last ``T/2`` with ``S`` (slow EMA), all without gradient. The target is the average velocity over the
jump, ``u = (x_start - x_end) / (s_0 - s_T) = sum_k d_k v_k / sum_k d_k``. The student is trained so that
``student(x_0, s_0) = u``: one Euler step over the whole jump lands where the sub-steps landed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from .jumps import FLOW, MODE_NAMES, SELF, TEACHER, JumpBatch
from .velocity import VelocityModel, expand_like, interpolate, select_rows


@dataclass
class TargetVelocities:
    """The networks that make targets, by role. All are called under ``torch.no_grad``.

    ``teacher`` may be None when no row is teacher-taught (from-scratch training). For the single-EMA variant
    pass the same callable as ``fast_ema`` and ``slow_ema``.
    """

    teacher: VelocityModel | None
    fast_ema: VelocityModel
    slow_ema: VelocityModel
    teacher_whole_jump: bool = False
    """Teacher-taught rows take every sub-step with the teacher, not only the first half. A student that folds
    guidance in starts as the unguided model, so its slow EMA's half of a teacher-taught target would pull it back
    towards the unguided flow; with the whole jump by the guided teacher those rows anchor it on the guided one."""


@dataclass
class TargetBatch:
    """What the student is regressed on: ``student(x, sigma, **cond) ~ target``."""

    x: torch.Tensor  # (B, ...) the state at the jump start
    sigma: torch.Tensor  # (B,) jump start sigma, in x's dtype
    target: torch.Tensor  # (B, ...) average velocity over the jump, or noise - x0 for FLOW rows
    mode: torch.Tensor  # (B,) long FLOW / TEACHER / SELF


def _velocity_by_rows(
    first: dict[int, VelocityModel | None],
    mode: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Evaluate a different network on each group of rows (by mode) and reassemble the batch."""
    out = torch.zeros_like(x)
    for row_mode, model in first.items():
        rows = (mode == row_mode).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        if model is None:
            raise ValueError(f"{MODE_NAMES[row_mode]}-taught rows need a {MODE_NAMES[row_mode]} velocity model")
        out[rows] = model(x[rows], sigma[rows], **select_rows(cond, rows)).to(x.dtype)
    return out


@torch.no_grad()
def shortcut_displacement(
    x_start: torch.Tensor,
    sigmas: torch.Tensor,
    mode: torch.Tensor,
    velocities: TargetVelocities,
    cond: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Run the ``t_skip`` sub-steps of every row and return the end state ``x_end`` (B, ...).

    ``mode`` must contain only TEACHER and SELF rows; ``sigmas`` is (B, t_skip + 1).
    """
    t_skip = sigmas.shape[1] - 1
    first = {TEACHER: velocities.teacher, SELF: velocities.fast_ema}
    x = x_start
    for k in range(t_skip):
        sigma_k = sigmas[:, k].to(x.dtype)
        if k < t_skip // 2:
            v = _velocity_by_rows(first, mode, x, sigma_k, cond)
        elif velocities.teacher_whole_jump:
            v = _velocity_by_rows({TEACHER: velocities.teacher, SELF: velocities.slow_ema}, mode, x, sigma_k, cond)
        else:
            v = velocities.slow_ema(x, sigma_k, **cond).to(x.dtype)
        x = x + expand_like(sigmas[:, k + 1] - sigmas[:, k], x) * v
    return x


@torch.no_grad()
def scfm_targets(
    x0: torch.Tensor,
    noise: torch.Tensor,
    jumps: JumpBatch,
    velocities: TargetVelocities,
    cond: Mapping[str, torch.Tensor] | None = None,
) -> TargetBatch:
    """Build the SCFM targets of a batch.

    Args:
        x0: (B, ...) data samples; ``noise``: same shape, standard normal.
        jumps: from :func:`~shortcutfm.core.jumps.sample_jumps` (moved to x0's device).
        velocities: teacher / fast EMA / slow EMA callables following the velocity contract.
        cond: per-sample conditioning passed to every velocity call.
    """
    cond = dict(cond or {})
    sigmas = jumps.sigmas.to(x0.device)
    mode = jumps.mode.to(x0.device)
    sigma = sigmas[:, 0].to(x0.dtype)
    x_start = interpolate(x0, noise, sigma)
    target = noise - x0  # plain flow matching, kept for FLOW rows

    rows = (mode != FLOW).nonzero(as_tuple=True)[0]
    if rows.numel():
        row_sigmas = sigmas[rows]
        x_end = shortcut_displacement(
            x_start[rows], row_sigmas, mode[rows], velocities, select_rows(cond, rows)
        )
        span = expand_like(row_sigmas[:, 0] - row_sigmas[:, -1], x_end)
        target[rows] = ((x_start[rows] - x_end) / span).to(target.dtype)
    return TargetBatch(x=x_start, sigma=sigma, target=target, mode=mode)


@dataclass
class LossResult:
    loss: torch.Tensor  # scalar, differentiable
    per_mode: dict[str, float]  # mean squared error of each mode present in the batch (for logging)


def scfm_loss(prediction: torch.Tensor, batch: TargetBatch) -> LossResult:
    """Mean squared error between the student's velocity and the target, uniform weight over rows."""
    per_row = F.mse_loss(prediction.float(), batch.target.float(), reduction="none").flatten(1).mean(1)
    per_mode = {
        MODE_NAMES[m]: per_row[batch.mode == m].mean().item()
        for m in (FLOW, TEACHER, SELF)
        if bool((batch.mode == m).any())
    }
    return LossResult(loss=per_row.mean(), per_mode=per_mode)
