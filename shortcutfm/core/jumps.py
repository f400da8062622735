"""Which jump each training sample learns: grid, start point, shift and teacher/self/flow mode.

See docs/method.md ("The target"): a sample is *teacher-taught* (probability ``teacher_prob``, grid of
``teacher_grid`` steps, first sub-steps by the frozen teacher) or *self-taught* (grid drawn from ``self_grids``,
first sub-steps by the fast EMA). A jump spans ``t_skip`` grid cells from an even start index. An optional
``flow_fraction`` of the batch gets the plain flow-matching target instead (mode ``FLOW``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grids import FIRST_SIGMA, grid_points, shift_sigma

FLOW, TEACHER, SELF = 0, 1, 2
MODE_NAMES = {FLOW: "flow", TEACHER: "teacher", SELF: "self"}


@dataclass
class JumpSampling:
    """How jumps are drawn for a batch. Defaults follow docs/method.md (the authors' dual-EMA recipe)."""

    teacher_prob: float = 0.4
    """Probability that a shortcut sample is teacher-taught (first sub-steps by the frozen teacher)."""
    teacher_grid: int = 32
    """Grid size N of teacher-taught samples."""
    self_grids: tuple[int, ...] = (2, 4, 8, 16)
    """Grid sizes drawn uniformly for self-taught samples (first sub-steps by the fast EMA)."""
    t_skip: int = 2
    """Grid cells per jump (even): the first t_skip/2 sub-steps by F, the last t_skip/2 by S."""
    shift_range: tuple[float, float] = (2.5, 4.5)
    """Per-sample shift drawn uniformly in this range (equal ends = a fixed shift)."""
    alt_shift_prob: float = 0.1
    """Probability that a sample uses ``alt_shift`` instead of ``shift_range``."""
    alt_shift: float | str = 1.0
    """The other shift: a number, or "dynamic" for Flux's resolution-dependent shift (needs num_tokens)."""
    flow_fraction: float = 0.0
    """Fraction of each batch with the plain flow-matching target ``noise - x0`` (0 for distillation)."""

    def __post_init__(self) -> None:
        self.self_grids = tuple(int(n) for n in self.self_grids)
        self.shift_range = tuple(float(s) for s in self.shift_range)
        if not 0.0 <= self.teacher_prob <= 1.0:
            raise ValueError(f"jumps.teacher_prob must be in [0, 1], got {self.teacher_prob}")
        if not 0.0 <= self.flow_fraction <= 1.0:
            raise ValueError(f"jumps.flow_fraction must be in [0, 1], got {self.flow_fraction}")
        if not 0.0 <= self.alt_shift_prob <= 1.0:
            raise ValueError(f"jumps.alt_shift_prob must be in [0, 1], got {self.alt_shift_prob}")
        if self.t_skip < 2 or self.t_skip % 2:
            raise ValueError(f"jumps.t_skip must be an even number >= 2, got {self.t_skip}")
        if not self.self_grids:
            raise ValueError("jumps.self_grids must name at least one grid size, e.g. [2, 4, 8, 16]")
        for name, sizes in (("teacher_grid", (self.teacher_grid,)), ("self_grids", self.self_grids)):
            for n in sizes:
                if n < self.t_skip or n % 2:
                    raise ValueError(
                        f"jumps.{name}: grid size {n} must be even and >= t_skip ({self.t_skip})"
                    )
        if len(self.shift_range) != 2 or not 0 < self.shift_range[0] <= self.shift_range[1]:
            raise ValueError(f"jumps.shift_range must be [low, high] with 0 < low <= high, got {self.shift_range}")
        if isinstance(self.alt_shift, str):
            if self.alt_shift != "dynamic":
                raise ValueError(f'jumps.alt_shift must be a number > 0 or "dynamic", got {self.alt_shift!r}')
        elif self.alt_shift <= 0:
            raise ValueError(f"jumps.alt_shift must be > 0, got {self.alt_shift}")


@dataclass
class JumpBatch:
    """The jumps of one batch; every field has the batch as its first dimension.

    ``sigmas[:, 0]`` is where the student is evaluated; ``sigmas[:, k]`` the k-th sub-step point of the jump.
    For ``FLOW`` rows only ``sigmas[:, 0]`` is used (a continuous sigma), the other columns repeat it.
    """

    sigmas: torch.Tensor  # (B, t_skip + 1) float64, decreasing along dim 1
    mode: torch.Tensor  # (B,) long: FLOW, TEACHER or SELF
    num_steps: torch.Tensor  # (B,) long grid size N (0 for FLOW rows)
    start: torch.Tensor  # (B,) long start index into the grid (0 for FLOW rows)
    shift: torch.Tensor  # (B,) float64 shift factor of each row
    t_skip: int = field(default=2)

    @property
    def sigma(self) -> torch.Tensor:
        """(B,) the sigma at which the student is evaluated."""
        return self.sigmas[:, 0]

    def rows(self, rows: slice | torch.Tensor) -> "JumpBatch":
        """The jumps of rows ``rows`` (a slice, index or mask tensor) of the batch."""
        return JumpBatch(self.sigmas[rows], self.mode[rows], self.num_steps[rows], self.start[rows], self.shift[rows],
                         self.t_skip)


def _draw_shifts(batch: int, spec: JumpSampling, generator, num_tokens: int | None) -> torch.Tensor:
    low, high = spec.shift_range
    shift = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
    use_alt = torch.rand(batch, generator=generator, dtype=torch.float64) < spec.alt_shift_prob
    if spec.alt_shift == "dynamic":
        if num_tokens is None:
            raise ValueError('jumps.alt_shift="dynamic" needs num_tokens (the number of latent tokens)')
        from .grids import mu_for_tokens_shift

        alt = mu_for_tokens_shift(num_tokens)
    else:
        alt = float(spec.alt_shift)
    return torch.where(use_alt, torch.full_like(shift, alt), shift)


def sample_jumps(
    batch: int,
    spec: JumpSampling,
    generator: torch.Generator | None = None,
    *,
    num_tokens: int | None = None,
    allow_teacher: bool = True,
) -> JumpBatch:
    """Draw the jumps of a batch of ``batch`` samples (CPU tensors; move them with ``.to``).

    The first ``round(flow_fraction * batch)`` rows are ``FLOW`` rows. Among the others each row is
    teacher-taught with probability ``teacher_prob`` (0 when ``allow_teacher`` is False, e.g. from-scratch
    training with no teacher), else self-taught. Start indices are even: ``0, 2, ..., N - t_skip``.
    """
    num_flow = int(round(spec.flow_fraction * batch))
    shift = _draw_shifts(batch, spec, generator, num_tokens)

    teacher_prob = spec.teacher_prob if allow_teacher else 0.0
    is_teacher = torch.rand(batch, generator=generator) < teacher_prob
    mode = torch.where(is_teacher, TEACHER, SELF).long()
    mode[:num_flow] = FLOW

    grids = torch.tensor(spec.self_grids, dtype=torch.long)
    num_steps = grids[torch.randint(len(grids), (batch,), generator=generator)]
    num_steps = torch.where(mode == TEACHER, spec.teacher_grid, num_steps)
    # even start indices 0, 2, ..., N - t_skip  (N and t_skip are even)
    num_starts = (num_steps - spec.t_skip) // 2 + 1
    start = 2 * (torch.rand(batch, generator=generator, dtype=torch.float64) * num_starts).long()
    offsets = torch.arange(spec.t_skip + 1, dtype=torch.long)
    sigmas = grid_points(num_steps, start.unsqueeze(-1) + offsets, shift)

    # FLOW rows: a continuous sigma with the row's shift, uniform before shifting
    flow_sigma = shift_sigma(torch.rand(batch, generator=generator, dtype=torch.float64), shift)
    flow_sigma = flow_sigma.clamp(max=FIRST_SIGMA)
    is_flow = (mode == FLOW).unsqueeze(-1)
    sigmas = torch.where(is_flow, flow_sigma.unsqueeze(-1).expand_as(sigmas), sigmas)
    num_steps = torch.where(mode == FLOW, 0, num_steps)
    start = torch.where(mode == FLOW, 0, start)
    return JumpBatch(sigmas=sigmas, mode=mode, num_steps=num_steps, start=start, shift=shift, t_skip=spec.t_skip)
