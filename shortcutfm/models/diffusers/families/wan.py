"""Wan 2.x text-to-video (``WanTransformer3DModel``): video latents, timestep = sigma * 1000, real CFG.

Boundary conversions (each tested):
* latents are video latents (B, C, F, H, W), the layout ``WanPipeline`` denoises in (no packing): F latent frames
  make ``(F - 1) * 4 + 1`` video frames; an image is a one-frame video (F = 1). The VAE is normalised per channel
  by ``latents_mean`` / ``latents_std`` (:class:`~..latent_codecs.NormalizedVideoVAE`);
* timestep: the transformer takes ``1000 * sigma`` (the scheduler's timesteps); the output is already
  ``noise - x0``;
* text: UMT5 states zero-padded to ``max_sequence_length`` by the pipeline itself and passed without a mask, so the
  padded rows take part in cross-attention: a cache must be made with the same text length the pipeline samples
  with (the library records it and samples with it).

Guidance: classifier-free with the empty negative prompt, ``v_u + g (v_c - v_u)``, pipeline ``guidance_scale``
(default 5, w = 4). Wan 2.2's two-expert models (``transformer_2``) are not supported: their experts split the
noise levels between two networks, and one SCFM student would have to span both.

Sampling shift: Wan 2.1's scheduler uses a fixed flow shift, 3 at 480p (5 at 720p); the family samples at 3.
"""

from __future__ import annotations

import torch
from diffusers import WanPipeline, WanTransformer3DModel

from .... import family_defaults
from ..guidance import RealGuidance
from ..latent_codecs import NormalizedVideoVAE
from .base import DiffusersVelocity, ModelFamily, PromptEncoding

#: Wan timesteps run over [0, 1000]
NUM_TRAIN_TIMESTEPS = 1000.0

LORA_TARGETS = (
    # self-attention and text cross-attention ("add_k_proj"/"add_v_proj": the image cross-attention of I2V models)
    "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj",
    # feed-forward
    "ffn.net.0.proj", "ffn.net.2",
    # condition embedder: timestep and text MLPs (linear_1/linear_2), the global modulation projection
    "linear_1", "linear_2", "time_proj",
    # output projection and the latent patch embedding (a Conv3d)
    "proj_out", "patch_embedding",
)


def check_video_latents(latents: torch.Tensor, sigma: torch.Tensor) -> tuple[int, ...]:
    """Validate the video contract's shapes; return ``(B, C, F, H, W)``."""
    if latents.ndim != 5:
        raise ValueError(f"Wan latents must be (B, C, F, H, W) video latents, got shape {tuple(latents.shape)}")
    if sigma.shape != (latents.shape[0],):
        raise ValueError(f"sigma must have shape ({latents.shape[0]},), got {tuple(sigma.shape)}")
    return tuple(latents.shape)


class WanVelocity(DiffusersVelocity):
    """``v = WanVelocity(transformer)(latents, sigma, prompt_embeds=)``; latents (B, C, F, H, W).

    Cond: ``prompt_embeds`` (B, L, 4096) UMT5 states, zero-padded to L = ``max_sequence_length``.
    """

    attention_kwargs_name = "attention_kwargs"

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, *, prompt_embeds: torch.Tensor) -> torch.Tensor:
        check_video_latents(latents, sigma)
        dtype = self.base_dtype
        out = self.transformer(
            hidden_states=latents.to(dtype),
            timestep=sigma.float() * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=prompt_embeds.to(dtype),
            return_dict=False,
            **self.lora_kwargs(),
        )[0]
        return out.to(latents.dtype)


def encode_prompts(pipe: WanPipeline, prompts: list[str], max_sequence_length: int = 512) -> PromptEncoding:
    """Cond and the empty negative prompt's (1, L, D) encoding, both padded to ``max_sequence_length`` tokens as
    the pipeline pads them."""
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError("this Wan pipeline has two experts (transformer_2, Wan 2.2 A14B): shortcutfm supports "
                         "single-transformer Wan models (Wan 2.1, Wan 2.2 TI2V-5B)")
    embeds, negative = pipe.encode_prompt(
        list(prompts), negative_prompt="", do_classifier_free_guidance=True, max_sequence_length=max_sequence_length
    )
    return PromptEncoding(cond={"prompt_embeds": embeds}, uncond={"prompt_embeds": negative[:1]})


WAN = ModelFamily(
    name="wan",
    velocity_class=WanVelocity,
    transformer_class=WanTransformer3DModel,
    pipeline_class=WanPipeline,
    cond_keys=("prompt_embeds",),
    lora_target_modules=LORA_TARGETS,
    guidance=RealGuidance(uncond_keys=("prompt_embeds",), scale=family_defaults.guidance_scale("wan")),
    encode_prompts=encode_prompts,
    shift_range=family_defaults.jump_shifts("wan")[0],
    alt_shift=family_defaults.jump_shifts("wan")[1],
    sampling_shift=family_defaults.sampling_shift("wan"),
    latents=NormalizedVideoVAE(keep_frames=True),
)
