"""Encoding with a loaded diffusers pipeline: prompts -> text tensors, images -> VAE latents.

The family-specific parts (which ``encode_prompt`` call, which text tensors, how the teacher's
``output_type="latent"`` result is laid out) come from the family registry
:data:`shortcutfm.models.diffusers.FAMILIES` (``ModelFamily.encode_prompts`` / ``cond_keys`` /
``from_pipeline_latents``), the same functions the adapters and samplers use, so cached text tensors are
exactly what sampling conditions on. Only public pipeline API is used.

Conventions of what is returned (and cached):

* latents: ``(B, C, H, W)`` in the VAE-latent layout the family's pipeline works in, i.e.
  ``(vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor`` for images. The *mean* of the latent
  distribution is used (deterministic, so a content hash identifies the record). Flux latents are stored
  unpacked; packing into 2x2 tokens is the adapter's job.
* text: ``prompt_embeds`` ``(B, L, D)``, plus ``pooled_prompt_embeds`` ``(B, D)`` (Flux, SD3) or
  ``prompt_attention_mask`` ``(B, L)`` (Lumina 2), as the pipeline's ``encode_prompt`` returns them.
* uncond: the empty prompt as the pipeline's classifier-free guidance encodes it (Lumina 2: without its
  system prompt); for Flux, which has no real CFG branch, ``encode_prompt("")``.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

TextTensors = dict[str, Tensor]


def pipeline_family(pipe):
    """The ``ModelFamily`` of ``pipe`` (ValueError naming the supported pipelines otherwise)."""
    from ..models.diffusers import family_of_pipeline  # diffusers is needed only once a pipeline is given

    return family_of_pipeline(pipe)


def pixel_multiple(pipe) -> int:
    """Image height and width must be multiples of this: VAE downsampling times the latent patch, which is 2x2
    in every supported family (Flux packs 2x2 tokens with a patch-1 transformer) or the transformer's own
    ``patch_size`` when that is larger (the t2i proving ground's SD3 uses 4x4)."""
    family = pipeline_family(pipe)
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    patch = getattr(config, "patch_size", None) or family.token_patch
    patch = int(patch[-1] if isinstance(patch, (tuple, list)) else patch)  # Wan: (frames, height, width)
    return family.latents.pixels_per_latent(pipe) * math.lcm(family.token_patch, patch)


def pipeline_default(pipe, argument: str):
    """The default of ``pipe(...)``'s ``argument`` (e.g. ``guidance_scale``, ``max_sequence_length``)."""
    return inspect.signature(pipe.__call__).parameters[argument].default


@torch.no_grad()
def encode_text(pipe, prompts: list[str], max_sequence_length: int) -> TextTensors:
    """Text tensors for ``prompts`` (batch first) under the family's ``cond_keys``."""
    return dict(pipeline_family(pipe).encode_prompts(pipe, list(prompts), max_sequence_length).cond)


@torch.no_grad()
def encode_uncond(pipe, max_sequence_length: int) -> TextTensors:
    """The empty prompt's text tensors (batch dim 1), see the module docstring."""
    encoding = pipeline_family(pipe).encode_prompts(pipe, [""], max_sequence_length)
    return dict(encoding.uncond if encoding.uncond is not None else encoding.cond)


@torch.no_grad()
def encode_images(pipe, images: list, height: int, width: int) -> Tensor:
    """PIL images -> ``(B, C, height/f, width/f)`` latents: resize (keeping the aspect ratio) and center crop to
    ``height x width`` with the pipeline's ``image_processor``, then ``(latent_dist.mean - shift) * scale``."""
    processor = getattr(pipe, "image_processor", None) or pipe.video_processor  # Wan has a video processor
    pixels = processor.preprocess(
        [image.convert("RGB") for image in images], height=height, width=width, resize_mode="crop"
    )
    return pipeline_family(pipe).latents.encode(pipe.vae, pixels)


def teacher_latents_to_vae_layout(pipe, latents: Tensor, height: int, width: int) -> Tensor:
    """What ``pipe(..., height=, width=, output_type="latent")`` returned -> ``(B, C, H, W)`` (already scaled)."""
    family = pipeline_family(pipe)
    factor = family.latents.pixels_per_latent(pipe)
    return family.latents.from_pipeline(pipe.vae, family.from_pipeline_latents(latents, height // factor, width // factor))
