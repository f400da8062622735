"""``shortcut``: a shortcut-model fine-tune (Frans, Hafner, Levine & Abbeel, ICLR 2025, eq. 5): the teacher's
network with an added, zero-initialised step-size input ``d`` (:class:`~.two_time.TwoTimeNetwork`), the
architecture change SCFM avoids.

Rows with ``d = 0`` learn the teacher's velocity (flow matching by distillation, as SCFM's teacher-taught rows);
a quarter of the batch learns self-consistency on dyadic step sizes ``d`` in ``{1/64, ..., 1/2}``, with ``t`` on
the grid of multiples of ``2d``:

    x' = x_t - d s(x_t, t, d),   target  s(x_t, t, 2d) = (s(x_t, t, d) + s(x', t - d, d)) / 2   (no gradient)

Sampling with ``n`` steps uses ``d = 1/n``.
"""

from __future__ import annotations

import torch

from ..core.velocity import expand_like, interpolate, select_rows
from .base import FewStepMethod, uniform_times
from .two_time import TwoTimeNetwork, interval_euler_sample

DYADIC = [2.0**-k for k in range(1, 7)]  # 1/2 .. 1/64: the step sizes 2d that self-consistency rows learn


@torch.no_grad()
def self_consistency_target(network, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, **cond) -> torch.Tensor:
    """The velocity of a ``2d`` step as the mean of two ``d`` steps of ``network`` itself."""
    first = network(x, t, d, **cond)
    x_mid = x - expand_like(d, x) * first
    second = network(x_mid, t - d, d, **cond)
    return (first + second) / 2


class ShortcutModel(FewStepMethod):
    name = "shortcut"
    cites = "Frans et al. 2025, One Step Diffusion via Shortcut Models, eq. 5"

    def __init__(self, teacher, consistency_fraction: float = 0.25):
        super().__init__(teacher)
        self.consistency_fraction = consistency_fraction

    def build_student(self, network):
        return TwoTimeNetwork(network)

    def loss(self, x0, noise, cond, generator, step):
        batch = len(x0)
        k = int(round(batch * self.consistency_fraction))
        # flow rows (d = 0): the teacher's velocity
        t = uniform_times(batch - k, generator)
        x = interpolate(x0[k:], noise[k:], t)
        rest = select_rows(cond, slice(k, None))
        with torch.no_grad():
            flow_target = self.teacher(x, t, **rest)
        flow = (self.student(x, t, torch.zeros_like(t), **rest) - flow_target).pow(2).sum()
        if k == 0:
            return flow / x0[k:].numel()
        # self-consistency rows: 2d dyadic, t a multiple of 2d in (0, 1]
        big = torch.tensor(DYADIC)[torch.randint(len(DYADIC), (k,), generator=generator)]
        cells = torch.floor(torch.rand(k, generator=generator) / big).clamp(min=0) + 1  # 1 .. 1/(2d)
        t_sc = (cells * big).clamp(max=1.0)
        d = big / 2
        head = select_rows(cond, slice(None, k))
        x_sc = interpolate(x0[:k], noise[:k], t_sc)
        target = self_consistency_target(self.student, x_sc, t_sc, d, **head)
        consistency = (self.student(x_sc, t_sc, big, **head) - target).pow(2).sum()
        return (flow + consistency) / x0.numel()

    def sample(self, noise, num_steps, cond, generator):
        return interval_euler_sample(self.student, noise, num_steps, cond)
