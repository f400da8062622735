"""The step sweep: every model and sampler at every step count and shift, from the same noise."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..core.calibration import for_steps
from ..core.grids import sigma_grid
from ..core.velocity import VelocityModel
from .judge import Judge, SampleSet, generate


@dataclass
class MetricRow:
    """One line of ``metrics.json``."""

    model: str  # "teacher", "student", "data" (the data-against-data floor), ...
    sampler: str  # "euler", "heun" or "-" for the floor
    steps: int
    nfe: int
    shift: float | str  # a number, or "dynamic" (Flux)
    metric: str
    value: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepSamples:
    """Samples kept for the figures: ``(model, sampler, steps, shift) -> model-space samples``."""

    by_key: dict[tuple[str, str, int, float], torch.Tensor]
    labels: torch.Tensor | None


def step_sweep(
    models: dict[str, tuple[VelocityModel, tuple[str, ...]]],
    judge: Judge,
    samples: SampleSet,
    steps: tuple[int, ...],
    shifts: tuple[float, ...],
    *,
    keep: set[tuple[str, str, int, float]] = frozenset(),
    progress: bool = True,
) -> tuple[list[MetricRow], SweepSamples]:
    """Score every ``(model, sampler, steps, shift)``.

    Args:
        models: name -> (velocity model, samplers to use), e.g. ``{"teacher": (t, ("euler", "heun"))}``.
        keep: keys whose samples are returned for figures.
    """
    rows: list[MetricRow] = []
    kept: dict = {}
    jobs = [(name, method, n, s) for name, (_, methods) in models.items() for method in methods for n in steps for s in shifts]
    for name, method, num_steps, shift in tqdm(jobs, desc="step sweep", disable=not progress, dynamic_ncols=True):
        velocity = for_steps(models[name][0], num_steps)  # a calibrated student: this step count's scale
        x, nfe = generate(velocity, samples, sigma_grid(num_steps, shift), method)
        for metric, value in judge.score(x, samples.labels).items():
            rows.append(MetricRow(name, method, num_steps, nfe, shift, metric, value))
        if (name, method, num_steps, shift) in keep:
            kept[(name, method, num_steps, shift)] = x
    return rows, SweepSamples(kept, samples.labels)


def floor_rows(judge: Judge, train) -> list[MetricRow]:
    """The data-against-data floor of every metric, as rows with model "data"."""
    return [MetricRow("data", "-", 0, 0, 0.0, metric, value) for metric, value in judge.floor(train).items()]


def find(rows: list[MetricRow], **match) -> float:
    """The value of the single row matching all fields in ``match`` (e.g. model="student", steps=3)."""
    found = [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows match {match}")
    return found[0].value
