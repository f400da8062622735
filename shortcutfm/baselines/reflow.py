"""``reflow``: rectified flow on the teacher's own (noise, sample) pairs (Liu et al., ICLR 2023, eq. 1 with the
coupling of Sec. 2.3), then sampled with a few Euler steps.

The teacher maps noise ``eps`` to ``x1 = ODE_T(eps)`` (``pair_steps`` Euler steps; their cost is reported as
wall time, not optimizer steps). The student, started from the teacher, learns the straight path between them:

    x_t = (1 - t) x1 + t eps,    target velocity  eps - x1    (constant along the path)

so a straight coupling can be integrated in one step.
"""

from __future__ import annotations

import torch

from ..core.grids import sigma_grid
from ..core.samplers import euler_sample
from ..core.velocity import interpolate
from .base import FewStepMethod, uniform_times


@torch.no_grad()
def teacher_pairs(teacher, num_pairs: int, sample_shape, labels: torch.Tensor | None, steps: int,
                  generator: torch.Generator, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise, teacher sample)`` pairs: Euler with ``steps`` uniform steps from each noise row."""
    noise = torch.randn((num_pairs, *sample_shape), generator=generator)
    grid = sigma_grid(steps, 1.0)
    samples = []
    for start in range(0, num_pairs, chunk):
        cond = {} if labels is None else {"y": labels[start:start + chunk]}
        samples.append(euler_sample(teacher, noise[start:start + chunk], grid, **cond).x)
    return noise, torch.cat(samples)


def reflow_batch(noise: torch.Tensor, samples: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on each pair's straight path and the path's constant velocity."""
    return interpolate(samples, noise, t), noise - samples


class Reflow(FewStepMethod):
    name = "reflow"
    cites = "Liu, Gong & Liu 2023, Flow Straight and Fast: rectified flow (reflow on teacher pairs)"

    def __init__(self, teacher, sample_shape, num_classes: int, num_pairs: int, generator: torch.Generator,
                 pair_steps: int = 32):
        super().__init__(teacher)
        self.labels = torch.arange(num_pairs) % num_classes if num_classes else None
        self.noise, self.samples = teacher_pairs(self.teacher, num_pairs, sample_shape, self.labels, pair_steps, generator)

    def loss(self, x0, noise, cond, generator, step):
        index = torch.randint(len(self.noise), (len(x0),), generator=generator)
        t = uniform_times(len(x0), generator)
        x, target = reflow_batch(self.noise[index], self.samples[index], t)
        pair_cond = {} if self.labels is None else {"y": self.labels[index]}
        return (self.student(x, t, **pair_cond) - target).pow(2).mean()
