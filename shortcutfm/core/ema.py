"""Exponential moving averages over an arbitrary set of named tensors.

An :class:`EMA` keeps *shadow* tensors and never writes into the live model: to evaluate an average, call
the model with the shadow tensors (``torch.func.functional_call`` for full models, a separate LoRA adapter for
parameter-efficient students). The shadow tensors may be owned by the EMA (``EMA.copy_of``) or be existing
tensors such as the weights of a non-trainable adapter (``EMA(shadow=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


class EMA:
    """``shadow <- decay * shadow + (1 - decay) * live`` over named tensors, in place."""

    def __init__(self, shadow: Mapping[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.shadow = dict(shadow)
        self.decay = float(decay)

    @classmethod
    def copy_of(cls, tensors: Mapping[str, torch.Tensor], decay: float) -> "EMA":
        return cls({name: t.detach().clone().float() for name, t in tensors.items()}, decay)

    def _check(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.shadow):
            missing, extra = set(self.shadow) - set(tensors), set(tensors) - set(self.shadow)
            raise KeyError(f"EMA tensors differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._check(tensors)
        for name, live in tensors.items():
            shadow = self.shadow[name]
            shadow.lerp_(live.detach().to(shadow.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def restart(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set the average to the live tensors (the single-EMA variant restarts every few hundred steps)."""
        self._check(tensors)
        for name, live in tensors.items():
            self.shadow[name].copy_(live.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._check(state)
        for name, value in state.items():
            self.shadow[name].copy_(value)


@dataclass
class EMASchedule:
    """Which EMAs a student keeps. Defaults follow the authors' dual-EMA scripts (docs/method.md)."""

    mode: str = "dual"
    """"dual": fast and slow EMAs; "single": one EMA (``slow_decay``) that serves as both."""
    fast_decay: float = 0.99
    """Decay of the fast EMA (first sub-steps of self-taught targets). Unused in single mode."""
    slow_decay: float = 0.999
    """Decay of the slow EMA (second sub-steps of every target)."""
    restart_every: int = 0
    """Restart the EMA(s) to the student every this many steps (0 = never; the paper's single EMA: ~1000)."""

    def __post_init__(self) -> None:
        if self.mode not in ("dual", "single"):
            raise ValueError(f'ema.mode must be "dual" or "single", got {self.mode!r}')
        for name in ("fast_decay", "slow_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ema.{name} must be in [0, 1), got {value}")
        if self.restart_every < 0:
            raise ValueError(f"ema.restart_every must be >= 0, got {self.restart_every}")


class StudentEMAs:
    """The fast and slow EMAs of a student (one shared EMA in single mode), with restarts.

    Args:
        schedule: decays, mode and restart period.
        fast_shadow, slow_shadow: the shadow tensors (for LoRA: the EMA adapters' weights), initialised by the
            caller to the starting student. In single mode ``fast_shadow`` is ignored.
    """

    def __init__(
        self,
        schedule: EMASchedule,
        slow_shadow: Mapping[str, torch.Tensor],
        fast_shadow: Mapping[str, torch.Tensor] | None = None,
    ):
        self.schedule = schedule
        self.slow = EMA(slow_shadow, schedule.slow_decay)
        if schedule.mode == "dual":
            if fast_shadow is None:
                raise ValueError("dual EMA mode needs fast_shadow tensors")
            self.fast = EMA(fast_shadow, schedule.fast_decay)
        else:
            self.fast = self.slow

    def averages(self) -> list[EMA]:
        return [self.slow] if self.fast is self.slow else [self.fast, self.slow]

    def update(self, step: int, student: Mapping[str, torch.Tensor]) -> None:
        """Update after optimiser step ``step`` (1-based); restart instead when the period divides it."""
        restart = self.schedule.restart_every and step % self.schedule.restart_every == 0
        for ema in self.averages():
            ema.restart(student) if restart else ema.update(student)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"slow.{n}": t for n, t in self.slow.state_dict().items()}
        if self.fast is not self.slow:
            state.update({f"fast.{n}": t for n, t in self.fast.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for prefix, ema in (("slow.", self.slow), ("fast.", self.fast)):
            if prefix == "fast." and ema is self.slow:
                continue
            ema.load_state_dict({n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)})
