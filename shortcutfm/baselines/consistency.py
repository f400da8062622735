"""``consistency``: consistency distillation for flow models, sampled multistep (LCM-style).

Song et al. (ICML 2023, "Consistency Models", eq. 7) with the flow parametrisation ``f(x, t) = x - t F(x, t)``
(``F`` the network's velocity output, so ``f(x, 0) = x`` holds by construction and the teacher's weights
start as its one-step Euler prediction of the data). On ``N`` uniform grid points, for ``t = t_n`` and
``t' = t_{n-1}``:

    x' = x_t + (t' - t) v_T(x_t, t)                  one teacher Euler step (the ODE solver)
    loss = || f_theta(x_t, t) - f_ema(x', t') ||^2     target: the EMA ("target network") at the next point

Sampling with ``n`` steps (Song et al., Algorithm 1; Luo et al. 2023, LCM): ``x0 = f(x, t_i)``, then re-noise
to ``t_{i+1}`` with fresh noise, ``x = (1 - t_{i+1}) x0 + t_{i+1} eps``; the last step returns ``x0``.
"""

from __future__ import annotations

import copy

import torch

from ..core.grids import sigma_grid
from ..core.velocity import batch_sigma, expand_like, interpolate
from .base import FewStepMethod


def consistency_function(network, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """``f(x, t) = x - t F(x, t)``: the data point the network maps ``x`` at time ``t`` to."""
    return x - expand_like(t, x) * network(x, t, **cond)


@torch.no_grad()
def consistency_target(ema, teacher, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, **cond) -> torch.Tensor:
    """The EMA's consistency function at the point one teacher Euler step from ``(x, t)`` to ``t_prev``."""
    x_prev = x + expand_like(t_prev - t, x) * teacher(x, t, **cond)
    return consistency_function(ema, x_prev, t_prev, **cond)


class ConsistencyDistillation(FewStepMethod):
    name = "consistency"
    cites = "Song et al. 2023, Consistency Models, eq. 7 (distillation) and Alg. 1 (multistep sampling)"

    def __init__(self, teacher, grid_size: int = 32, ema_decay: float = 0.95):
        super().__init__(teacher)
        self.grid_size, self.ema_decay = grid_size, ema_decay
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)

    def loss(self, x0, noise, cond, generator, step):
        grid = sigma_grid(self.grid_size, 1.0, dtype=x0.dtype).flip(0)  # increasing: t_0 = 0 .. t_N = 1
        index = torch.randint(1, self.grid_size + 1, (len(x0),), generator=generator)
        t, t_prev = grid[index], grid[index - 1]
        x = interpolate(x0, noise, t)
        target = consistency_target(self.ema, self.teacher, x, t, t_prev, **cond)
        return (consistency_function(self.student, x, t, **cond) - target).pow(2).mean()

    @torch.no_grad()
    def after_step(self, step):
        for average, live in zip(self.ema.parameters(), self.student.parameters()):
            average.lerp_(live.detach(), 1 - self.ema_decay)

    @torch.no_grad()
    def sample(self, noise, num_steps, cond, generator):
        grid = sigma_grid(num_steps, 1.0, dtype=noise.dtype).tolist()
        x = noise
        for t, t_next in zip(grid[:-1], grid[1:]):
            x0 = consistency_function(self.student, x, batch_sigma(t, x), **cond)
            if t_next == 0:
                return x0
            fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = (1 - t_next) * x0 + t_next * fresh
        return x
