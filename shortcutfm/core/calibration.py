"""Step-count calibration: one scale per sampling step count between the teacher and the student.

An SCFM student has no step-size input, so one network serves every jump size; trained mostly on the large jumps of
few-step samplers, it drifts from the teacher's instantaneous velocity that many small steps need (docs/method.md,
"Step-count calibration"). A scale ``a`` per step count N moves the deployed model along the line between them:

* full-parameter students: weights ``teacher + a * (student - teacher)`` (:class:`WeightInterpolation`);
* LoRA students: the LoRA scale ``a`` (the adapter's delta is already ``student - teacher``).

``a = 1`` is the student, ``a = 0`` the teacher, ``a > 1`` extrapolates (a few-step sampler that wants more of the
student than it learnt). :func:`calibrate` picks, for each N, the scale whose N-step Euler samples are closest to
the teacher's ``reference_steps``-step samples from the same noise: a teacher-relative criterion that needs no
data, so no held-out set is looked at. "Closest" is a ``distance(samples, reference)``: the mean squared distance
of paired samples by default (LoRA runs); the built-in trainer passes a distribution distance to the *training*
data instead (energy distance, or Frechet distance in a classifier's features), since any teacher-relative
distance pulls a student that is better than its teacher back towards it (measured on digits:
docs/results/step_calibration_digits.md).

With the paired distance each sample has its own error, so the choice can be told from noise: the scale kept is
the one nearest 1 whose mean error exceeds the best scale's by at most one standard error of their paired
difference (the "one-standard-error rule" of model selection). A scale away from the student as trained must
earn its place on these samples; a gain smaller than the samples can resolve keeps the student as it is. (A
paired error also rewards a slight pull towards the average image, which a Frechet distance on new prompts
penalises: docs/results/t2i_fewshot_style.md.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .grids import sigma_grid
from .samplers import euler_sample
from .velocity import VelocityModel

#: the scales tried for each step count by default: the teacher (0) to a 2x extrapolation of the student
DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


@dataclass
class StepCalibration:
    """The scale chosen for each calibrated step count, and how it was chosen."""

    scales: dict[int, float]
    """Step count N -> scale a (1 = the student as trained)."""
    shift: float | str
    """Grid shift the calibration sampled with (a number, or "dynamic" for a diffusers family's own)."""
    reference_steps: int = 32
    """Teacher Euler steps of the reference samples."""
    errors: dict[int, dict[float, float]] = field(default_factory=dict)
    """N -> {a: distance to the reference} for every scale tried."""
    metric: str = "mse"
    """The distance: "mse" (paired samples) or the name of a distribution distance (e.g. "energy_distance")."""

    def scale_for(self, steps: int) -> float:
        """The scale for ``steps``: its own, or that of the nearest calibrated step count (in log steps; ties go to
        the larger count)."""
        if steps in self.scales:
            return self.scales[steps]
        nearest = min(self.scales, key=lambda n: (abs(math.log(n) - math.log(steps)), -n))
        return self.scales[nearest]

    def to_dict(self) -> dict:
        values = asdict(self)
        values["scales"] = {str(n): a for n, a in self.scales.items()}
        values["errors"] = {str(n): {str(a): e for a, e in table.items()} for n, table in self.errors.items()}
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> "StepCalibration":
        return cls(
            scales={int(n): float(a) for n, a in values["scales"].items()},
            shift=values["shift"] if isinstance(values["shift"], str) else float(values["shift"]),
            reference_steps=int(values.get("reference_steps", 32)),
            errors={int(n): {float(a): float(e) for a, e in table.items()}
                    for n, table in values.get("errors", {}).items()},
            metric=str(values.get("metric", "mse")),
        )


@torch.no_grad()
def calibrate(
    velocity_at: Callable[[float], VelocityModel],
    teacher: VelocityModel,
    noise: torch.Tensor,
    steps: Sequence[int],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    shift: float | str = 1.0,
    reference_steps: int = 32,
    grid: Callable[[int], torch.Tensor] | None = None,
    batch_size: int | None = None,
    distance: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    metric: str = "mse",
    **cond: torch.Tensor,
) -> StepCalibration:
    """For each N in ``steps``, the scale (of ``scales``) whose N-step Euler samples from ``noise`` are closest to the
    teacher's ``reference_steps``-step samples from the same noise.

    ``velocity_at(a)`` is the deployed model at scale ``a`` (e.g. ``WeightInterpolation(...).at``); ``teacher`` the
    guided teacher; ``cond`` per-sample conditioning. Grids: ``sigma_grid(n, shift)``, or ``grid(n)`` (e.g. a
    diffusers family's dynamic shift; ``shift`` is then only recorded). ``batch_size`` samples in chunks (large
    models). ``distance(samples, reference)``: lower is closer, recorded as ``metric``; on equal distances the
    scale nearest 1 wins. Default: the paired mean squared distance with the one-standard-error rule (module
    docstring).
    """
    grid_of = grid if grid is not None else (lambda n: sigma_grid(n, shift))
    chunk = batch_size or len(noise)

    def samples(model: VelocityModel, n: int) -> torch.Tensor:
        parts = []
        for start in range(0, len(noise), chunk):
            rows = slice(start, start + chunk)
            parts.append(euler_sample(model, noise[rows], grid_of(n), **{k: v[rows] for k, v in cond.items()}).x)
        return torch.cat(parts).float()

    reference = samples(teacher, reference_steps)
    chosen, errors = choose_scales(lambda a, n: samples(velocity_at(a), n), reference, steps, scales, distance)
    return StepCalibration(chosen, shift if isinstance(shift, str) else float(shift), int(reference_steps), errors,
                           metric)


def paired_errors(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each sample's mean squared distance to its reference sample (same noise), shape (N,), float64."""
    return (samples.double() - reference.double()).pow(2).flatten(1).mean(1)


def one_standard_error_choice(per_sample: Mapping[float, torch.Tensor]) -> float:
    """The scale nearest 1 whose mean paired error is within one standard error of the best scale's.

    ``per_sample``: scale -> each sample's error (the same samples and noise for every scale). The standard error
    is that of the per-sample difference to the best scale (paired, so shared noise cancels); with one sample there
    is none and the best scale is kept."""
    means = {a: float(e.mean()) for a, e in per_sample.items()}
    best = min(means, key=lambda a: (means[a], abs(a - 1.0)))
    count = per_sample[best].numel()
    if count < 2:
        return best

    def within(a: float) -> bool:
        difference = per_sample[a] - per_sample[best]
        return float(difference.mean()) <= float(difference.std() / math.sqrt(count))

    return min((a for a in means if within(a)), key=lambda a: (abs(a - 1.0), means[a]))


def choose_scales(
    sample_at: Callable[[float, int], torch.Tensor], reference: torch.Tensor, steps: Sequence[int],
    scales: Sequence[float], distance: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
) -> tuple[dict[int, float], dict[int, dict[float, float]]]:
    """The selection rule of :func:`calibrate` for any sampler: ``sample_at(a, n)`` gives n-step samples at scale
    a from the noise of ``reference``; returns ``({n: chosen a}, {n: {a: distance}})``. With a ``distance``, the
    closest scale (ties to the scale nearest 1); without, the paired mean squared distance and the one-standard-
    error rule (:func:`one_standard_error_choice`)."""
    if not steps or any(n < 1 for n in steps):
        raise ValueError(f"calibration steps must be step counts >= 1, got {list(steps)}")
    if not scales:
        raise ValueError("calibration scales must hold at least one scale, e.g. [0.5, 1.0, 1.5]")
    chosen, errors = {}, {}
    for n in steps:
        if distance is None:
            per_sample = {float(a): paired_errors(sample_at(float(a), int(n)), reference) for a in scales}
            errors[int(n)] = {a: float(e.mean()) for a, e in per_sample.items()}
            chosen[int(n)] = one_standard_error_choice(per_sample)
        else:
            table = {float(a): float(distance(sample_at(float(a), int(n)), reference)) for a in scales}
            errors[int(n)] = table
            chosen[int(n)] = min(table, key=lambda a: (table[a], abs(a - 1.0)))
    return chosen, errors


class _Interpolated(nn.Module):
    """``module`` evaluated with the parameters ``teacher + a * (student - teacher)`` (no copy of the module)."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.module = module
        self.params = params

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.params, (x, sigma), cond)


class WeightInterpolation:
    """Full-parameter students between teacher and student weights: ``at(a)`` is a velocity model whose every
    floating-point parameter is ``teacher + a * (student - teacher)`` (both modules of one architecture)."""

    def __init__(self, student: nn.Module, teacher_state: Mapping[str, torch.Tensor]):
        self.student = student
        own = dict(student.named_parameters())
        missing = sorted(set(own) - set(teacher_state))
        if missing:
            raise ValueError(f"the teacher's weights lack {missing[:3]}...: they must be the student's architecture")
        self.student_params = {n: p.detach() for n, p in own.items()}
        self.teacher_params = {n: teacher_state[n].to(p.device, p.dtype) for n, p in self.student_params.items()}

    def at(self, scale: float) -> nn.Module:
        if scale == 1.0:
            return self.student
        params = {n: t + scale * (self.student_params[n] - t) for n, t in self.teacher_params.items()}
        return _Interpolated(self.student, params)


class CalibratedVelocity(nn.Module):
    """A student that samples each step count at its calibrated scale: ``for_steps(n)`` is the velocity model to use
    with an n-step sampler; calling it directly is the student as trained (scale 1).

    ``guide`` wraps every returned model (e.g. classifier-free guidance)."""

    def __init__(self, velocity_at: Callable[[float], VelocityModel], calibration: StepCalibration,
                 guide: Callable[[VelocityModel], VelocityModel] = lambda model: model):
        super().__init__()
        self.velocity_at, self.calibration, self.guide = velocity_at, calibration, guide

    @property
    def plain(self) -> VelocityModel:
        """The student as trained (scale 1)."""
        return self.guide(self.velocity_at(1.0))

    def for_steps(self, steps: int) -> VelocityModel:
        return self.guide(self.velocity_at(self.calibration.scale_for(steps)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return self.plain(x, sigma, **cond)


def for_steps(velocity: VelocityModel, steps: int) -> VelocityModel:
    """The model to sample ``steps`` steps with: a :class:`CalibratedVelocity`'s calibrated one, else ``velocity``."""
    return velocity.for_steps(steps) if isinstance(velocity, CalibratedVelocity) else velocity
