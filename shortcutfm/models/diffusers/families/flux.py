"""FLUX.1 (``FluxTransformer2DModel``): packed 2x2 latent tokens, timestep = sigma, embedded guidance.

Boundary conversions (each tested):
* latents (B, C, H, W) <-> tokens (B, H/2 * W/2, 4C), the packing of ``FluxPipeline``;
* ``img_ids`` (H/2 * W/2, 3) = (0, row, column) of each token, ``txt_ids`` (L, 3) = zeros;
* timestep: the pipeline passes ``sigma * 1000 / 1000``, so the transformer receives sigma itself (it
  multiplies by 1000 inside); ``guidance`` (B,) is passed as the raw guidance value (e.g. 3.5).
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from .... import family_defaults
from .base import DiffusersVelocity, ModelFamily, PromptEncoding, check_latents
from ..guidance import EmbeddedGuidance

LORA_TARGETS = (
    # attention, image and text streams (double blocks) and the single blocks' q/k/v
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    # MLPs: double blocks' image/text feed-forwards, single blocks' fused MLP and output projections
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    # AdaLN modulation linears
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
    # embedders: latent tokens, text tokens, timestep / guidance / pooled-text MLPs
    "x_embedder", "context_embedder", "linear_1", "linear_2",
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each token holds one 2x2 patch, channel-major."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}: use an image size divisible by 16")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` x ``width``."""
    b, _, packed_channels = tokens.shape
    c = packed_channels // 4
    patches = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids ``(0, row, column)`` of the packed tokens of an H x W latent."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


class FluxVelocity(DiffusersVelocity):
    """``v = FluxVelocity(transformer)(latents, sigma, prompt_embeds=, pooled_prompt_embeds=, guidance=)``.

    Cond: ``prompt_embeds`` (B, L, 4096) T5 states, ``pooled_prompt_embeds`` (B, 768) CLIP pooled output,
    ``guidance`` (B,) guidance value (required when the model has a guidance embedder, e.g. FLUX.1-dev;
    ignored otherwise, e.g. FLUX.1-schnell).
    """

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _, _, height, width = check_latents(latents, sigma)
        dtype, device = self.base_dtype, latents.device
        if self.transformer.config.guidance_embeds:
            if guidance is None:
                raise ValueError(
                    "this Flux model embeds guidance: add cond 'guidance' (B,), e.g. with "
                    "FLUX.training_cond(cond, generator) or FLUX.sampling_cond(cond)"
                )
            guidance = guidance.to(dtype)
        else:
            guidance = None
        out = self.transformer(
            hidden_states=pack_latents(latents).to(dtype),
            timestep=sigma.to(dtype),
            guidance=guidance,
            pooled_projections=pooled_prompt_embeds.to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=latent_image_ids(height, width, device=device, dtype=dtype),
            return_dict=False,
            **self.lora_kwargs(),
        )[0]
        return unpack_latents(out, height, width).to(latents.dtype)


def encode_prompts(pipe: FluxPipeline, prompts: list[str], max_sequence_length: int = 512) -> PromptEncoding:
    """``prompt_embeds`` (B, L, D) and ``pooled_prompt_embeds`` (B, D) from the pipeline's encoders."""
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, max_sequence_length=max_sequence_length
    )
    return PromptEncoding(cond={"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}, uncond=None)


FLUX = ModelFamily(
    name="flux",
    velocity_class=FluxVelocity,
    transformer_class=FluxTransformer2DModel,
    pipeline_class=FluxPipeline,
    cond_keys=("prompt_embeds", "pooled_prompt_embeds"),
    lora_target_modules=LORA_TARGETS,
    guidance=EmbeddedGuidance(train_range=(0.0, 7.5), sampling_value=3.5),
    encode_prompts=encode_prompts,
    shift_range=family_defaults.jump_shifts("flux")[0],
    alt_shift=family_defaults.jump_shifts("flux")[1],
    sampling_shift=family_defaults.sampling_shift("flux"),
    to_pipeline_latents=pack_latents,
    from_pipeline_latents=unpack_latents,
)
