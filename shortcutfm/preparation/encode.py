"""Per-family encoding with a loaded diffusers pipeline: prompts -> text tensors, images -> VAE latents.

Everything family-specific lives in one :class:`FamilyEncoding` per family (the ``FAMILY_ENCODINGS`` table);
the functions below it are shared. Only public pipeline API is used (``encode_prompt``, ``vae``,
``image_processor``, ``vae_scale_factor``).

Conventions of what is returned (and cached):

* latents: ``(B, C, H, W)`` in the VAE-latent layout the family's pipeline works in, i.e.
  ``(vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor`` for images. The *mean* of the latent
  distribution is used (deterministic, so a content hash identifies the record); Flux latents are stored
  unpacked ``(C, H, W)``, packing into tokens is the transformer adapter's job.
* text: ``prompt_embeds`` ``(B, L, D)``, plus ``pooled_prompt_embeds`` ``(B, D)`` (Flux, SD3) or
  ``prompt_attention_mask`` ``(B, L)`` (Lumina 2), exactly as the pipeline's ``encode_prompt`` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

TextTensors = dict[str, Tensor]


@dataclass(frozen=True)
class FamilyEncoding:
    """How one model family encodes text and what its teacher pipeline returns for ``output_type="latent"``."""

    name: str  # family name, the same as the key in shortcutfm.models.diffusers.FAMILIES
    pipeline_class: str  # name of the diffusers pipeline class (or a base class) of this family
    text_keys: tuple[str, ...]  # the text tensors stored for every record (and in uncond.safetensors)
    default_max_sequence_length: int  # the pipeline's own default for max_sequence_length
    encode_text: Callable[[Any, list[str], int], TextTensors]  # (pipe, prompts, max_len) -> batched tensors
    encode_uncond: Callable[[Any, int], TextTensors]  # (pipe, max_len) -> the CFG branch's "" tensors (B=1)
    pixel_multiple: Callable[[Any], int]  # pipe -> height/width must be multiples of this
    teacher_latents_to_vae_layout: Callable[[Any, Tensor, int, int], Tensor]  # (pipe, out, h, w) -> (B,C,H,W)


# ---- Flux: CLIP pooled + T5 sequence; teacher output is packed 2x2 patches, (B, H/2 * W/2, C * 4)


def _flux_text(pipe, prompts: list[str], max_sequence_length: int) -> TextTensors:
    prompt_embeds, pooled_prompt_embeds, _text_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, max_sequence_length=max_sequence_length
    )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def _flux_pixel_multiple(pipe) -> int:
    return pipe.vae_scale_factor * 2  # VAE downsampling, then 2x2 packing


def unpack_flux_latents(packed: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """``(B, (H/2)*(W/2), C*4)`` packed Flux tokens -> ``(B, C, H, W)`` latents (``H, W`` in latent pixels)."""
    batch, num_tokens, packed_channels = packed.shape
    rows, cols = latent_height // 2, latent_width // 2
    if rows * cols != num_tokens or packed_channels % 4:
        raise ValueError(
            f"packed Flux latents of shape {tuple(packed.shape)} do not match a {latent_height}x{latent_width} latent"
        )
    patches = packed.reshape(batch, rows, cols, packed_channels // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, packed_channels // 4, rows * 2, cols * 2)


def _flux_teacher_latents(pipe, latents: Tensor, height: int, width: int) -> Tensor:
    return unpack_flux_latents(latents, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


# ---- SD3 / SD3.5: two CLIPs (pooled) + T5; teacher output is already (B, C, H, W)


def _sd3_text(pipe, prompts: list[str], max_sequence_length: int) -> TextTensors:
    prompt_embeds, _neg, pooled_prompt_embeds, _neg_pooled = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def _sd3_uncond(pipe, max_sequence_length: int) -> TextTensors:
    # With CFG the pipeline encodes negative_prompt="" through the same path as a prompt.
    return _sd3_text(pipe, [""], max_sequence_length)


def _sd3_pixel_multiple(pipe) -> int:
    return pipe.vae_scale_factor * pipe.transformer.config.patch_size


# ---- Lumina 2: Gemma hidden states + attention mask; the prompt gets the system prompt, the CFG branch not


def _lumina2_text(pipe, prompts: list[str], max_sequence_length: int) -> TextTensors:
    prompt_embeds, prompt_attention_mask, _neg, _neg_mask = pipe.encode_prompt(
        prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
    )
    return {"prompt_embeds": prompt_embeds, "prompt_attention_mask": prompt_attention_mask}


def _lumina2_uncond(pipe, max_sequence_length: int) -> TextTensors:
    # Lumina 2 encodes the negative "" *without* the system prompt: take that branch, as the pipeline does.
    _pos, _pos_mask, negative_embeds, negative_mask = pipe.encode_prompt(
        prompt=[""], do_classifier_free_guidance=True, negative_prompt=[""], max_sequence_length=max_sequence_length
    )
    return {"prompt_embeds": negative_embeds, "prompt_attention_mask": negative_mask}


def _same_layout(pipe, latents: Tensor, height: int, width: int) -> Tensor:
    return latents


FAMILY_ENCODINGS: dict[str, FamilyEncoding] = {
    "flux": FamilyEncoding(
        name="flux",
        pipeline_class="FluxPipeline",
        text_keys=("prompt_embeds", "pooled_prompt_embeds"),
        default_max_sequence_length=512,
        encode_text=_flux_text,
        encode_uncond=lambda pipe, max_len: _flux_text(pipe, [""], max_len),
        pixel_multiple=_flux_pixel_multiple,
        teacher_latents_to_vae_layout=_flux_teacher_latents,
    ),
    "sd3": FamilyEncoding(
        name="sd3",
        pipeline_class="StableDiffusion3Pipeline",
        text_keys=("prompt_embeds", "pooled_prompt_embeds"),
        default_max_sequence_length=256,
        encode_text=_sd3_text,
        encode_uncond=_sd3_uncond,
        pixel_multiple=_sd3_pixel_multiple,
        teacher_latents_to_vae_layout=_same_layout,
    ),
    "lumina2": FamilyEncoding(
        name="lumina2",
        pipeline_class="Lumina2Pipeline",
        text_keys=("prompt_embeds", "prompt_attention_mask"),
        default_max_sequence_length=256,
        encode_text=_lumina2_text,
        encode_uncond=_lumina2_uncond,
        pixel_multiple=lambda pipe: pipe.vae_scale_factor * 2,
        teacher_latents_to_vae_layout=_same_layout,
    ),
}


def family_of(pipe) -> FamilyEncoding:
    """The :class:`FamilyEncoding` whose pipeline class ``pipe`` is (or derives from)."""
    class_names = {cls.__name__ for cls in type(pipe).__mro__}
    for family in FAMILY_ENCODINGS.values():
        if family.pipeline_class in class_names:
            return family
    supported = ", ".join(f"{f.pipeline_class} ({f.name})" for f in FAMILY_ENCODINGS.values())
    raise TypeError(f"cannot prepare data with a {type(pipe).__name__}; supported pipelines: {supported}")


@torch.no_grad()
def encode_text(pipe, prompts: list[str], max_sequence_length: int) -> TextTensors:
    """Text tensors for ``prompts`` (batch first), with the family's keys; see the module docstring."""
    return family_of(pipe).encode_text(pipe, list(prompts), max_sequence_length)


@torch.no_grad()
def encode_uncond(pipe, max_sequence_length: int) -> TextTensors:
    """The empty-prompt tensors (batch dim 1) exactly as the pipeline's classifier-free guidance branch uses them."""
    return family_of(pipe).encode_uncond(pipe, max_sequence_length)


@torch.no_grad()
def encode_images(pipe, images: list, height: int, width: int) -> Tensor:
    """RGB PIL images -> ``(B, C, height/f, width/f)`` latents: resize (keeping aspect) + center crop to
    ``height x width`` with the pipeline's ``image_processor``, then ``(latent_dist.mean - shift) * scale``."""
    pixels = pipe.image_processor.preprocess(
        [image.convert("RGB") for image in images], height=height, width=width, resize_mode="crop"
    )
    vae = pipe.vae
    latent_mean = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    shift_factor = vae.config.shift_factor or 0.0
    return (latent_mean - shift_factor) * vae.config.scaling_factor


def teacher_latents_to_vae_layout(pipe, latents: Tensor, height: int, width: int) -> Tensor:
    """What ``pipe(..., output_type="latent")`` returned -> ``(B, C, H, W)`` latents (already scaled)."""
    return family_of(pipe).teacher_latents_to_vae_layout(pipe, latents, height, width)
