"""Training-free samplers of the teacher at matched NFE: Euler, Heun, midpoint (:mod:`shortcutfm.core.samplers`)
and diffusers' multistep flow solvers, DPM-Solver++(2M) (Lu et al. 2022) and UniPC (Zhao et al. 2023).

The diffusers schedulers are driven on shortcutfm's convention: built with ``use_flow_sigmas=True``,
``prediction_type="flow_prediction"`` and ``flow_shift=1``, their ``sigmas`` are the uniform grid (1 is noise,
0 is data; the first point is ``1 - 1/1000`` for DPM-Solver++), and the velocity model is called with
``scheduler.sigmas[i]``, the sigma the scheduler integrates from (its ``timesteps`` are only that sigma times
1000). Each step costs one evaluation.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..core.grids import sigma_grid
from ..core.samplers import sample as core_sample
from ..core.velocity import batch_sigma

__all__ = ["SOLVERS", "solve", "flow_scheduler", "solver_steps"]

CORE = ("euler", "heun", "midpoint")
DIFFUSERS = ("dpmsolver++", "unipc")
SOLVERS = CORE + DIFFUSERS


def flow_scheduler(name: str):
    """A diffusers multistep scheduler for flow-matching velocities on the uniform grid."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 1.0}
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    if name == "unipc":
        return UniPCMultistepScheduler(solver_order=2, **common)
    raise ValueError(f"unknown diffusers solver {name!r}; choose one of {DIFFUSERS}")


def solver_steps(name: str, nfe: int) -> int | None:
    """The most steps of ``name`` that cost at most ``nfe`` evaluations (Heun: ``2n - 1``, midpoint: ``2n``,
    the others ``n``); None if even one step costs more."""
    if name == "heun":
        return (nfe + 1) // 2
    if name == "midpoint":
        return nfe // 2 or None
    return nfe


@torch.no_grad()
def solve(name: str, model, noise: torch.Tensor, num_steps: int, cond: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sample with solver ``name`` in ``num_steps`` steps; returns (samples, NFE)."""
    if name in CORE:
        result = core_sample(model, noise, sigma_grid(num_steps, 1.0), name, **cond)
        return result.x, result.nfe
    scheduler = flow_scheduler(name)
    scheduler.set_timesteps(num_steps)
    x = noise
    for index, timestep in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[index])
        velocity = model(x, batch_sigma(sigma, x), **cond)
        x = scheduler.step(velocity, timestep, x, return_dict=False)[0]
    return x, len(scheduler.timesteps)
