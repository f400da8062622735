"""``meanflow``: a MeanFlow fine-tune (Geng, Deng, Bai, Kolter & He, 2025, eq. 6 and 10): the network, given a
second time input (the interval ``h = t - r``, zero-initialised, :class:`~.two_time.TwoTimeNetwork`), learns
the average velocity ``u(z_t, r, t)`` over ``[r, t]`` through the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . d_z u + d_t u   (r held fixed)

computed with one Jacobian-vector product (``torch.func.jvp``, tangents ``(v, 1, 1)`` for ``(z, t, h)``).
``v`` is the teacher's velocity (distillation). ``r = t`` for ``1 - interval_fraction`` of the rows (plain flow
matching). Sampling with ``n`` steps: ``z_{t'} = z_t - (t - t') u(z_t, t', t)``.
"""

from __future__ import annotations

import torch
from torch.func import jvp

from ..core.velocity import expand_like, interpolate
from .base import FewStepMethod, uniform_times
from .two_time import TwoTimeNetwork, interval_euler_sample


def meanflow_target(average_velocity, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, v: torch.Tensor):
    """``(u, target)``: ``u = average_velocity(z, t, h)`` and the identity's right side ``v - h du/dt``
    (no gradient through the target). ``average_velocity(z, t, h)`` is ``u`` over ``[t - h, t]``."""
    u, du_dt = jvp(average_velocity, (z, t, h), (v, torch.ones_like(t), torch.ones_like(h)))
    return u, (v - expand_like(h, z) * du_dt).detach()


class MeanFlow(FewStepMethod):
    name = "meanflow"
    cites = "Geng et al. 2025, Mean Flows for One-step Generative Modeling, eq. 6 (identity) and 10 (loss)"

    def __init__(self, teacher, interval_fraction: float = 0.25):
        super().__init__(teacher)
        self.interval_fraction = interval_fraction

    def build_student(self, network):
        return TwoTimeNetwork(network)

    def loss(self, x0, noise, cond, generator, step):
        batch = len(x0)
        t = uniform_times(batch, generator)
        r = t * torch.rand(batch, generator=generator)
        r = torch.where(torch.rand(batch, generator=generator) < self.interval_fraction, r, t)
        z = interpolate(x0, noise, t)
        with torch.no_grad():
            v = self.teacher(z, t, **cond)
        u, target = meanflow_target(lambda z_, t_, h_: self.student(z_, t_, h_, **cond), z, t, t - r, v)
        return (u - target).pow(2).mean()

    def sample(self, noise, num_steps, cond, generator):
        return interval_euler_sample(self.student, noise, num_steps, cond)
