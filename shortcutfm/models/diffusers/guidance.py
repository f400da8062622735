"""How a family is guided (docs/method.md, "Guidance"), as cond transforms and velocity wrappers.

* :class:`EmbeddedGuidance`: guidance-distilled models (FLUX.1-dev) take the guidance value as an input. It is a
  per-sample cond tensor ``guidance`` (B,): uniform in ``train_range`` while training (the same value for the
  student, teacher and EMA passes of a sample), a fixed value at sampling time. No wrapper.
* :class:`RealGuidance`: classifier-free guidance with the empty prompt as the negative (SD3, Lumina 2),
  ``v = v_cond + scale * (v_cond - v_uncond)``, for the student and every target alike.

Scale convention: ``scale`` here is ``w`` in ``v_cond + w (v_cond - v_uncond)``; diffusers pipelines write the
same rule as ``v_uncond + g (v_cond - v_uncond)``, so their ``guidance_scale`` is ``g = w + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ...core.guidance import ClassifierFreeGuidance
from ..student import Wrap, no_wrap


def _batch_of(cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not cond:
        raise ValueError("cond is empty: pass the cached prompt embeddings (e.g. prompt_embeds)")
    return next(iter(cond.values()))


@dataclass(frozen=True)
class EmbeddedGuidance:
    """Guidance as a model input (guidance-distilled models), the cond key ``key`` of shape (B,)."""

    train_range: tuple[float, float] = (0.0, 7.5)
    """Training draws one value per sample, uniform in [low, high)."""
    sampling_value: float = 3.5
    """Value used at sampling time unless another is given."""
    key: str = "guidance"

    def __post_init__(self) -> None:
        low, high = self.train_range
        if not 0.0 <= low <= high:
            raise ValueError(f"guidance.train_range must satisfy 0 <= low <= high, got {self.train_range}")

    def training_cond(self, cond: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        reference = _batch_of(cond)
        low, high = self.train_range
        device = generator.device if generator is not None else torch.device("cpu")
        values = low + (high - low) * torch.rand(reference.shape[0], generator=generator, device=device)
        return {**cond, self.key: values.to(reference.device)}

    def sampling_cond(self, cond: Mapping[str, torch.Tensor], value: float | None = None) -> dict:
        reference = _batch_of(cond)
        value = self.sampling_value if value is None else float(value)
        return {**cond, self.key: torch.full((reference.shape[0],), value, device=reference.device)}

    def wrap(self, uncond: Mapping[str, torch.Tensor] | None = None, scale: float | None = None) -> Wrap:
        """No wrapper: the guidance is part of cond."""
        return no_wrap

    scale_argument = "guidance_scale"

    def pipeline_kwargs(self, value: float | None = None) -> dict:
        return {"guidance_scale": self.sampling_value if value is None else float(value)}

    def teacher_kwargs(self) -> dict:
        return {}


@dataclass(frozen=True)
class RealGuidance:
    """Classifier-free guidance against the empty prompt; ``uncond_keys`` are replaced by its embeddings."""

    uncond_keys: tuple[str, ...]
    scale: float = 3.5
    """``w`` of ``v_cond + w (v_cond - v_uncond)`` (pipeline ``guidance_scale`` = w + 1); 0 = no guidance."""
    pipeline_extra: Mapping[str, object] = field(default_factory=dict)
    """Extra pipeline arguments that make the pipeline's guidance equal to this rule."""
    scale_argument: str = "guidance_scale"
    """The pipeline's argument for ``w + 1`` (Qwen-Image: ``true_cfg_scale``)."""
    negative_prompt: str | None = None
    """Passed as the pipeline's ``negative_prompt`` when the pipeline guides only with one (Qwen-Image: "")."""
    rescale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """``(v_cond, v_guided) -> v`` after the rule, where the pipeline always applies one (Qwen-Image)."""

    def training_cond(self, cond: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        return dict(cond)

    def sampling_cond(self, cond: Mapping[str, torch.Tensor], value: float | None = None) -> dict:
        return dict(cond)

    def uncond_fn(self, uncond: Mapping[str, torch.Tensor]):
        """Map a batch's cond to its unconditional counterpart: ``uncond`` (1, ...) expanded to the batch."""
        missing = [key for key in self.uncond_keys if key not in uncond]
        if missing:
            raise ValueError(
                f"uncond lacks {missing}: pass the empty-prompt encoding with keys {list(self.uncond_keys)}, "
                "e.g. family.encode_prompts(pipe, prompts).uncond"
            )

        def substitute(cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = dict(cond)
            for key in self.uncond_keys:
                value, empty = cond[key], uncond[key]
                if empty.shape[0] != 1 or empty.shape[1:] != value.shape[1:]:
                    raise ValueError(
                        f"uncond[{key!r}] has shape {tuple(empty.shape)} but the batch has "
                        f"{tuple(value.shape)}: encode the empty prompt once (batch 1) with the same "
                        "max_sequence_length as the prompts"
                    )
                out[key] = empty.to(device=value.device, dtype=value.dtype).expand_as(value)
            return out

        return substitute

    def wrap(self, uncond: Mapping[str, torch.Tensor] | None, scale: float | None = None) -> Wrap:
        """A wrapper ``velocity -> guided velocity`` (one batched pass of 2B rows per call)."""
        scale = self.scale if scale is None else float(scale)
        if scale == 0.0:
            return no_wrap
        if uncond is None:
            raise ValueError(
                "this family uses classifier-free guidance: pass uncond= the empty-prompt embeddings "
                f"{list(self.uncond_keys)} as (1, ...) tensors, or guidance scale 0 to train unguided"
            )
        uncond_fn = self.uncond_fn(uncond)

        def wrap(model):
            return ClassifierFreeGuidance(model, scale, uncond_fn, rescale=self.rescale)

        return wrap

    def pipeline_kwargs(self, scale: float | None = None) -> dict:
        scale = self.scale if scale is None else float(scale)
        return {self.scale_argument: scale + 1.0, **self.pipeline_extra, **self.teacher_kwargs()}

    def teacher_kwargs(self) -> dict:
        """Pipeline arguments besides the scale without which the pipeline would not guide (a negative prompt)."""
        return {} if self.negative_prompt is None else {"negative_prompt": self.negative_prompt}
