"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): timestep = sigma * 1000, real CFG.

Boundary conversion (tested): the transformer takes ``timestep = 1000 * sigma`` (the scheduler's timesteps);
latents stay (B, C, H, W). Guidance: classifier-free with the empty prompt, ``w = 3.5`` (see
:mod:`shortcutfm.models.diffusers.guidance` for the scale convention).
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from .... import family_defaults
from .base import DiffusersVelocity, ModelFamily, PromptEncoding, check_latents
from ..guidance import RealGuidance

#: SD3 timesteps run over [0, 1000]
NUM_TRAIN_TIMESTEPS = 1000.0

LORA_TARGETS = (
    # attention of the image and text streams (also matches SD3.5's second attention, attn2)
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    # MLPs
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    # AdaLN modulation linears
    "norm1.linear", "norm1_context.linear", "norm_out.linear",
    # embedders (latent patches: a 2x2 conv, text tokens, timestep and pooled-text MLPs), output projection
    "pos_embed.proj", "context_embedder", "linear_1", "linear_2", "proj_out",
)


class SD3Velocity(DiffusersVelocity):
    """``v = SD3Velocity(transformer)(latents, sigma, prompt_embeds=, pooled_prompt_embeds=)``.

    Cond: ``prompt_embeds`` (B, 77 + L, 4096) joint CLIP/T5 states, ``pooled_prompt_embeds`` (B, 2048).
    """

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        check_latents(latents, sigma)
        dtype = self.base_dtype
        out = self.transformer(
            hidden_states=latents.to(dtype),
            timestep=sigma.float() * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled_prompt_embeds.to(dtype),
            return_dict=False,
            **self.lora_kwargs(),
        )[0]
        return out.to(latents.dtype)


def encode_prompts(
    pipe: StableDiffusion3Pipeline, prompts: list[str], max_sequence_length: int = 256
) -> PromptEncoding:
    """Cond and the empty negative prompt's (1, ...) embeddings, as the pipeline makes them for CFG."""
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
        negative_prompt="", max_sequence_length=max_sequence_length,
    )
    return PromptEncoding(
        cond={"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled},
        uncond={"prompt_embeds": negative_embeds[:1], "pooled_prompt_embeds": negative_pooled[:1]},
    )


SD3 = ModelFamily(
    name="sd3",
    velocity_class=SD3Velocity,
    transformer_class=SD3Transformer2DModel,
    pipeline_class=StableDiffusion3Pipeline,
    cond_keys=("prompt_embeds", "pooled_prompt_embeds"),
    lora_target_modules=LORA_TARGETS,
    guidance=RealGuidance(uncond_keys=("prompt_embeds", "pooled_prompt_embeds"),
                          scale=family_defaults.guidance_scale("sd3")),
    encode_prompts=encode_prompts,
    shift_range=family_defaults.jump_shifts("sd3")[0],
    alt_shift=family_defaults.jump_shifts("sd3")[1],
    sampling_shift=family_defaults.sampling_shift("sd3"),
)
