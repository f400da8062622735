"""Qwen-Image (``QwenImageTransformer2DModel``): packed 2x2 tokens, timestep = sigma, norm-rescaled real CFG.

Boundary conversions (each tested):
* latents (B, C, H, W) <-> tokens (B, H/2 * W/2, 4C), the packing of ``QwenImagePipeline`` (the same as Flux's);
  ``img_shapes`` = (1 frame, H/2, W/2) per sample;
* timestep: the pipeline passes ``t / 1000`` = sigma (the transformer multiplies by 1000 inside); the output is
  already ``noise - x0`` (no sign flip);
* text: Qwen2.5-VL states after the pipeline's prompt template, zero-padded here to ``max_sequence_length`` with
  ``prompt_embeds_mask`` (B, L) (the pipeline pads only to the longest prompt of a batch; padding under the mask
  changes nothing, tested), so every cached record and the empty prompt's encoding have one shape;
* latents: the VAE is a video-style 3-D VAE normalised by per-channel ``latents_mean`` / ``latents_std``; an
  image is its one-frame video, and the contract's latents drop the frame axis (:class:`OneFrameVAE`).

Guidance: "true CFG" with the empty negative prompt, ``g = true_cfg_scale``: ``comb = u + g (c - u)`` and then
``comb * |c| / |comb|``, the norms per image token (2x2 patch x all channels). ``QwenImagePipeline`` always
rescales this way, so the family's guidance does too (:func:`token_norm_rescale`).

Sampling shift: the teacher's scheduler uses a dynamic shift (about 2 at 1024^2) with a terminal stretch; the
family samples and selects at a fixed shift 3, the setting of the widely used few-step Qwen-Image LoRAs
(Qwen-Image-Lightning's scheduler holds ``exp(mu) = 3`` at every size).
"""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from .... import family_defaults
from ..guidance import RealGuidance
from ..latent_codecs import NormalizedVideoVAE
from .base import DiffusersVelocity, ModelFamily, PromptEncoding, check_latents
from .flux import pack_latents, unpack_latents

LORA_TARGETS = (
    # joint attention: image stream, text stream, outputs
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    # image and text MLPs
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    # modulation linears (per block, image and text) and the output AdaLN
    "img_mod.1", "txt_mod.1", "norm_out.linear",
    # embedders (latent tokens, text states, timestep MLP) and the output projection
    "img_in", "txt_in", "linear_1", "linear_2", "proj_out",
)


def token_norm_rescale(v_cond: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """``guided * |v_cond| / |guided|``, the norms over each 2x2 patch and all channels (one packed token), as
    ``QwenImagePipeline`` rescales its true-CFG prediction."""
    b, c, h, w = guided.shape

    def patches(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, c, h // 2, 2, w // 2, 2)

    def token_norm(x: torch.Tensor) -> torch.Tensor:
        return patches(x).pow(2).sum(dim=(1, 3, 5), keepdim=True).sqrt()

    return (patches(guided) * (token_norm(v_cond) / token_norm(guided))).reshape(b, c, h, w)


class QwenImageVelocity(DiffusersVelocity):
    """``v = QwenImageVelocity(transformer)(latents, sigma, prompt_embeds=, prompt_embeds_mask=)``.

    Cond: ``prompt_embeds`` (B, L, 3584) Qwen2.5-VL states (zero-padded), ``prompt_embeds_mask`` (B, L) 1 for
    tokens, 0 for padding.
    """

    attention_kwargs_name = "attention_kwargs"

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor,
    ) -> torch.Tensor:
        batch, _, height, width = check_latents(latents, sigma)
        dtype = self.base_dtype
        out = self.transformer(
            hidden_states=pack_latents(latents).to(dtype),
            timestep=sigma.to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            encoder_hidden_states_mask=prompt_embeds_mask,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
            **self.lora_kwargs(),
        )[0]
        return unpack_latents(out, height, width).to(latents.dtype)


def _padded(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> dict[str, torch.Tensor]:
    """Embeddings zero-padded (or cut) to ``length`` tokens, with their mask (all ones where the pipeline gives None)."""
    batch, tokens, _ = embeds.shape
    if mask is None:
        mask = torch.ones(batch, tokens, dtype=torch.long, device=embeds.device)
    if tokens < length:
        embeds = torch.cat([embeds, embeds.new_zeros(batch, length - tokens, embeds.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(batch, length - tokens)], dim=1)
    return {"prompt_embeds": embeds[:, :length], "prompt_embeds_mask": mask[:, :length].long()}


def encode_prompts(pipe: QwenImagePipeline, prompts: list[str], max_sequence_length: int = 512) -> PromptEncoding:
    """Cond and the empty negative prompt's (1, ...) encoding, both padded to ``max_sequence_length`` tokens."""
    embeds, mask = pipe.encode_prompt(list(prompts), max_sequence_length=max_sequence_length)
    empty, empty_mask = pipe.encode_prompt([QWEN_IMAGE.guidance.negative_prompt], max_sequence_length=max_sequence_length)
    return PromptEncoding(cond=_padded(embeds, mask, max_sequence_length),
                          uncond=_padded(empty, empty_mask, max_sequence_length))


QWEN_IMAGE = ModelFamily(
    name="qwen_image",
    velocity_class=QwenImageVelocity,
    transformer_class=QwenImageTransformer2DModel,
    pipeline_class=QwenImagePipeline,
    cond_keys=("prompt_embeds", "prompt_embeds_mask"),
    lora_target_modules=LORA_TARGETS,
    guidance=RealGuidance(
        uncond_keys=("prompt_embeds", "prompt_embeds_mask"),
        scale=family_defaults.guidance_scale("qwen_image"),  # the pipeline's default true_cfg_scale 4.0
        scale_argument="true_cfg_scale", negative_prompt="", rescale=token_norm_rescale,
    ),
    encode_prompts=encode_prompts,
    shift_range=family_defaults.jump_shifts("qwen_image")[0],
    alt_shift=family_defaults.jump_shifts("qwen_image")[1],
    sampling_shift=family_defaults.sampling_shift("qwen_image"),
    to_pipeline_latents=pack_latents,
    from_pipeline_latents=unpack_latents,
    latents=NormalizedVideoVAE(keep_frames=False),
)
