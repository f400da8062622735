"""``scfm``: ours (docs/method.md), with the library's defaults, trained by the bench's shared loop.

Jumps, targets and loss are :mod:`shortcutfm.core` (``sample_jumps``, ``scfm_targets``, ``scfm_loss``): the
velocity of a jump across ``t_skip`` grid cells is the average of a first half (teacher or fast EMA) and a
second half (slow EMA), with no step-size input. The EMAs are :class:`~shortcutfm.models.student.FullStudent`'s.
"""

from __future__ import annotations

from ..core.ema import EMASchedule
from ..core.jumps import JumpSampling, sample_jumps
from ..core.targets import scfm_loss, scfm_targets
from ..models.student import FullStudent
from .base import FewStepMethod


class SCFM(FewStepMethod):
    name = "scfm"
    cites = "SCFM (NeurIPS 2025), docs/method.md: dual-EMA shortcut targets without a step-size input"

    def __init__(self, teacher, jumps: JumpSampling | None = None, ema: EMASchedule | None = None):
        super().__init__(teacher)
        self.jumps = jumps or JumpSampling()
        self.full = FullStudent(self.student, ema or EMASchedule(), teacher=False)
        self.full.teacher = self.teacher  # the frozen teacher the base class made (FullStudent would copy another)
        self.targets = self.full.target_velocities()  # teacher, fast EMA, slow EMA

    def loss(self, x0, noise, cond, generator, step):
        jumps = sample_jumps(len(x0), self.jumps, generator, num_tokens=None, allow_teacher=True)
        batch = scfm_targets(x0, noise, jumps, self.targets, cond)
        return scfm_loss(self.student(batch.x, batch.sigma, **cond), batch).loss

    def after_step(self, step):
        self.full.emas.update(step, self.full.trainable_tensors())
