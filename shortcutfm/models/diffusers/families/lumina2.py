"""Lumina-Image 2.0 (``Lumina2Transformer2DModel``): inverted time and an inverted velocity, real CFG.

Boundary conversions (each tested):
* time: Lumina runs from noise at t = 0 to data at t = 1, so the transformer takes ``t = 1 - sigma``;
* velocity: it predicts ``d x / d t = x0 - noise``, so ``v = -output`` (``Lumina2Pipeline`` negates it too);
* text: Gemma states with a padding mask, ``prompt_attention_mask`` (B, L) is required.

Guidance: classifier-free with the empty prompt. ``Lumina2Pipeline`` by default also rescales the guided
velocity ("cfg_normalization"); this family uses the plain rule, so samplers pass ``cfg_normalization=False``.
"""

from __future__ import annotations

import torch
from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

from .... import family_defaults
from .base import DiffusersVelocity, ModelFamily, PromptEncoding, check_latents
from ..guidance import RealGuidance

LORA_TARGETS = (
    # attention (image, text and joint blocks)
    "to_q", "to_k", "to_v", "to_out.0",
    # SwiGLU MLPs; "linear_1"/"linear_2" also match the timestep embedder and the output AdaLN
    "linear_1", "linear_2", "linear_3",
    # AdaLN modulation linears
    "norm1.linear",
    # embedders: latent patches and caption projection
    "x_embedder", "caption_embedder.1",
)


class Lumina2Velocity(DiffusersVelocity):
    """``v = Lumina2Velocity(transformer)(latents, sigma, prompt_embeds=, prompt_attention_mask=)``.

    Cond: ``prompt_embeds`` (B, L, 2304) Gemma-2 states (second to last layer), ``prompt_attention_mask``
    (B, L) 1 for tokens, 0 for padding.
    """

    attention_kwargs_name = "attention_kwargs"

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        check_latents(latents, sigma)
        dtype = self.base_dtype
        out = self.transformer(
            hidden_states=latents.to(dtype),
            timestep=1.0 - sigma.float(),
            encoder_hidden_states=prompt_embeds.to(dtype),
            encoder_attention_mask=prompt_attention_mask,
            return_dict=False,
            **self.lora_kwargs(),
        )[0]
        return -out.to(latents.dtype)


def encode_prompts(
    pipe: Lumina2Pipeline, prompts: list[str], max_sequence_length: int = 256, system_prompt: str | None = None
) -> PromptEncoding:
    """Cond (with the pipeline's system prompt) and the empty negative prompt's (1, ...) encoding."""
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=True, negative_prompt="",
        max_sequence_length=max_sequence_length, system_prompt=system_prompt,
    )
    return PromptEncoding(
        cond={"prompt_embeds": embeds, "prompt_attention_mask": mask},
        uncond={"prompt_embeds": negative_embeds[:1], "prompt_attention_mask": negative_mask[:1]},
    )


LUMINA2 = ModelFamily(
    name="lumina2",
    velocity_class=Lumina2Velocity,
    transformer_class=Lumina2Transformer2DModel,
    pipeline_class=Lumina2Pipeline,
    cond_keys=("prompt_embeds", "prompt_attention_mask"),
    lora_target_modules=LORA_TARGETS,
    guidance=RealGuidance(
        uncond_keys=("prompt_embeds", "prompt_attention_mask"),
        scale=family_defaults.guidance_scale("lumina2"),  # the pipeline's default guidance_scale 4.0
        pipeline_extra={"cfg_normalization": False, "cfg_trunc_ratio": 1.0},
    ),
    encode_prompts=encode_prompts,
    shift_range=family_defaults.jump_shifts("lumina2")[0],
    alt_shift=family_defaults.jump_shifts("lumina2")[1],
    sampling_shift=family_defaults.sampling_shift("lumina2"),
)
