"""The registry of supported diffusers model families, and loading their pretrained transformers."""

from __future__ import annotations

import torch

from .base import DiffusersVelocity, ModelFamily, PromptEncoding
from .flux import FLUX, FluxVelocity
from .flux2 import FLUX2, Flux2Velocity
from .lumina2 import LUMINA2, Lumina2Velocity
from .qwen_image import QWEN_IMAGE, QwenImageVelocity
from .sd3 import SD3, SD3Velocity
from .wan import WAN, WanVelocity

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (FLUX, SD3, LUMINA2, FLUX2, QWEN_IMAGE, WAN)}


def get_family(family: str | ModelFamily) -> ModelFamily:
    """The :class:`ModelFamily` named ``family`` (a family object is returned unchanged)."""
    if isinstance(family, ModelFamily):
        return family
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def family_of_pipeline(pipe) -> ModelFamily:
    """The family whose pipeline class ``pipe`` is an instance of."""
    for family in FAMILIES.values():
        if isinstance(pipe, family.pipeline_class):
            return family
    known = {name: family.pipeline_class.__name__ for name, family in FAMILIES.items()}
    raise ValueError(f"no model family for a {type(pipe).__name__}; supported pipelines: {known}")


def load_transformer(
    family: str | ModelFamily,
    pretrained_path_or_id: str,
    subfolder: str | None = "transformer",
    dtype: torch.dtype = torch.bfloat16,
    **from_pretrained_kwargs,
) -> torch.nn.Module:
    """Load the family's pretrained transformer (e.g. ``"black-forest-labs/FLUX.1-dev"``), frozen and in eval mode.

    ``subfolder`` is the transformer's folder in a pipeline repository (None for a bare transformer folder).
    """
    transformer_class = get_family(family).transformer_class
    transformer = transformer_class.from_pretrained(
        pretrained_path_or_id, subfolder=subfolder, torch_dtype=dtype, **from_pretrained_kwargs
    )
    return transformer.eval().requires_grad_(False)


__all__ = [
    "FAMILIES", "FLUX", "SD3", "LUMINA2", "FLUX2", "QWEN_IMAGE", "WAN", "DiffusersVelocity", "FluxVelocity",
    "SD3Velocity", "Lumina2Velocity", "Flux2Velocity", "QwenImageVelocity", "WanVelocity",
    "ModelFamily", "PromptEncoding", "family_of_pipeline", "get_family", "load_transformer",
]
