"""Guidance as wrappers around the velocity contract (never flags of a sampler or of the objective)."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from .velocity import VelocityModel

UncondFn = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
Rescale = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ClassifierFreeGuidance(nn.Module):
    """``v = v_cond + scale * (v_cond - v_uncond)``, computed in one batched pass of ``2B`` rows.

    Args:
        model: the conditional velocity model.
        scale: guidance weight ``w``; 0 returns ``v_cond`` with a single pass.
        uncond_fn: maps the conditioning of a batch to its unconditional counterpart (for class labels:
            the null label; for text: the empty-prompt embeddings).
        rescale: optional ``(v_cond, v_guided) -> v`` applied to the guided velocity (e.g. Qwen-Image's
            rescaling to the conditional prediction's norm); None: the plain rule.
    """

    def __init__(self, model: VelocityModel, scale: float, uncond_fn: UncondFn, rescale: Rescale | None = None):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        self.uncond_fn = uncond_fn
        self.rescale = rescale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if self.scale == 0.0:
            return self.model(x, sigma, **cond)
        uncond = self.uncond_fn(cond)
        if set(uncond) != set(cond):
            raise ValueError(f"uncond_fn returned keys {sorted(uncond)}, expected {sorted(cond)}")
        both = {name: torch.cat([cond[name], uncond[name]]) for name in cond}
        v_cond, v_uncond = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        guided = v_cond + self.scale * (v_cond - v_uncond)
        return guided if self.rescale is None else self.rescale(v_cond, guided)


def null_label_uncond(null_label: int, key: str = "y") -> UncondFn:
    """Unconditional counterpart for class-conditional models: every label becomes ``null_label``."""

    def uncond(cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(cond)
        out[key] = torch.full_like(cond[key], null_label)
        return out

    return uncond
