"""FLUX.2 [klein] (``Flux2Transformer2DModel``, ``Flux2KleinPipeline``): patchified, batch-normalised latents,
timestep = sigma, real CFG for the klein base models.

Boundary conversions (each tested):
* latents: the pipeline denoises the VAE latent patchified 2x2 into channels and normalised by the VAE's batch-norm
  statistics, (B, 4C, H/16, W/16) for the real VAE; that is the contract's layout (:class:`Flux2Latents`), so every
  latent cell is one token (``token_patch = 1``). ``output_type="latent"`` returns the raw VAE latent (un-normalised,
  un-patchified): the codec maps it back;
* tokens: the cells row by row, (B, h*w, 4C); position ids have four axes (t, h, w, l): ``img_ids`` = (0, row,
  column, 0), ``txt_ids`` = (0, 0, 0, token index);
* timestep: the pipeline passes ``t / 1000`` = sigma (the transformer multiplies by 1000 inside); the output is
  ``noise - x0``.
* text: Qwen3 hidden states of three layers side by side, padded to ``max_sequence_length`` by the pipeline (no
  mask reaches the transformer).

Guidance: klein *base* models use classifier-free guidance with the empty prompt, ``v_u + g (v_c - v_u)``,
pipeline ``guidance_scale`` (default 4, w = 3). The step-distilled klein models (``is_distilled`` in their
``model_index.json``) ignore guidance: they already sample in about 4 steps; to train on one anyway, set
``model.guidance_scale=0``.

Shift: the pipeline's own rule (``compute_empirical_mu``, from the image tokens and the step count) is the family's
``"dynamic"`` shift, used for sampling and selection; training draws the authors' per-sample shifts plus, for 10%
of samples, FLUX.2's own shift of a 4-step sampler at 1024^2 (about 9.9).
"""

from __future__ import annotations

import math

import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from .... import family_defaults
from ..guidance import RealGuidance
from ..latent_codecs import ScaledVAE
from .base import DiffusersVelocity, ModelFamily, PromptEncoding, check_latents

#: FLUX.2 [dev] has 48 single blocks, klein 4B 20, klein 9B 24
MAX_SINGLE_BLOCKS = 64

LORA_TARGETS = (
    # double blocks: attention of the image and text streams, their MLPs
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    # single blocks: the fused qkv + MLP input projection
    "attn.to_qkv_mlp_proj",
    # modulation (shared by all blocks of a kind) and the output AdaLN
    "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
    "norm_out.linear",
    # embedders (latent tokens, text states, timestep MLP) and the output projection
    "x_embedder", "context_embedder", "linear_1", "linear_2", "proj_out",
) + tuple(  # single blocks' output projection, named in full: the suffix "attn.to_out" would also match the double
    # blocks' to_out ModuleList, which peft refuses
    f"single_transformer_blocks.{index}.attn.to_out" for index in range(MAX_SINGLE_BLOCKS)
)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); output channel ``c * 4 + 2 * dy + dx`` (the pipeline's patchify)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = latents.shape
    return latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


class Flux2Latents(ScaledVAE):
    """FLUX.2's latents: ``(patchify(z) - bn.running_mean) / sqrt(bn.running_var + eps)``, z the VAE latent's mode
    (its mean), (B, 4C, H/(2f), W/(2f)), f = ``pipe.vae_scale_factor``."""

    def pixels_per_latent(self, pipe) -> int:
        return 2 * int(pipe.vae_scale_factor)

    def default_size(self, pipe) -> tuple[int, int]:
        size = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        return size, size

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]:
        factor = self.pixels_per_latent(pipe)
        return 4 * int(pipe.vae.config.latent_channels), height // factor, width // factor

    @staticmethod
    def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def from_pipeline(self, vae, raw: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result (the raw VAE latent) -> the contract's layout."""
        patches = patchify(raw)
        mean, std = self._stats(vae, patches)
        return (patches - mean) / std

    @torch.no_grad()
    def encode(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        raw = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        return self.from_pipeline(vae, raw)

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        latents = latents.to(param.device, param.dtype)
        mean, std = self._stats(vae, latents)
        return vae.decode(unpatchify(latents * std + mean)).sample.float().cpu()


def token_ids(height: int, width: int, device=None) -> torch.Tensor:
    """(h*w, 4) position ids ``(0, row, column, 0)`` of the cells of an h x w latent, row by row."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1)


def text_ids(length: int, device=None) -> torch.Tensor:
    """(L, 4) position ids ``(0, 0, 0, l)`` of the text tokens."""
    index = torch.arange(length, device=device)
    zeros = torch.zeros_like(index)
    return torch.stack([zeros, zeros, zeros, index], dim=-1)


class Flux2Velocity(DiffusersVelocity):
    """``v = Flux2Velocity(transformer)(latents, sigma, prompt_embeds=)``; latents (B, 4C, h, w).

    Cond: ``prompt_embeds`` (B, L, 3 D) Qwen3 states of three layers (klein 4B: D = 2560). FLUX.2 [dev]'s guidance
    embedder (``guidance_embeds``) is not used by klein and not supported here.
    """

    # the transformer's LoRA-scale argument; the pipeline's is attention_kwargs
    attention_kwargs_name = "joint_attention_kwargs"
    pipeline_attention_kwargs_name = "attention_kwargs"

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, *, prompt_embeds: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = check_latents(latents, sigma)
        if self.transformer.config.guidance_embeds:
            raise ValueError("this FLUX.2 transformer embeds guidance (FLUX.2 [dev]): shortcutfm's flux2 family "
                             "supports FLUX.2 [klein]")
        dtype, device = self.base_dtype, latents.device
        out = self.transformer(
            hidden_states=latents.reshape(batch, channels, height * width).transpose(1, 2).to(dtype),
            timestep=sigma.to(dtype),
            guidance=None,
            encoder_hidden_states=prompt_embeds.to(dtype),
            txt_ids=text_ids(prompt_embeds.shape[1], device),
            img_ids=token_ids(height, width, device),
            return_dict=False,
            **self.lora_kwargs(),
        )[0]
        return out.transpose(1, 2).reshape(batch, channels, height, width).to(latents.dtype)


def encode_prompts(pipe: Flux2KleinPipeline, prompts: list[str], max_sequence_length: int = 512) -> PromptEncoding:
    """Cond and the empty negative prompt's (1, L, D) encoding (the pipeline pads both to ``max_sequence_length``)."""
    embeds, _ = pipe.encode_prompt(list(prompts), max_sequence_length=max_sequence_length)
    empty, _ = pipe.encode_prompt([""], max_sequence_length=max_sequence_length)
    return PromptEncoding(cond={"prompt_embeds": embeds}, uncond={"prompt_embeds": empty})


def dynamic_mu(num_tokens: int, num_steps: int) -> float:
    """FLUX.2's own ``mu`` of the shift ``exp(mu)`` for ``num_tokens`` image tokens and ``num_steps`` steps."""
    return compute_empirical_mu(int(num_tokens), int(num_steps))


#: FLUX.2's own shift for a 4-step sampler at 1024^2 (4096 tokens): the family's alternative training shift
#: (``family_defaults`` holds it as a number, 9.89, as it imports no diffusers; a test checks the two agree)
FEW_STEP_SHIFT = round(math.exp(dynamic_mu(4096, 4)), 2)

FLUX2 = ModelFamily(
    name="flux2",
    velocity_class=Flux2Velocity,
    transformer_class=Flux2Transformer2DModel,
    pipeline_class=Flux2KleinPipeline,
    cond_keys=("prompt_embeds",),
    lora_target_modules=LORA_TARGETS,
    guidance=RealGuidance(uncond_keys=("prompt_embeds",), scale=family_defaults.guidance_scale("flux2")),
    encode_prompts=encode_prompts,
    shift_range=family_defaults.jump_shifts("flux2")[0],
    alt_shift=family_defaults.jump_shifts("flux2")[1],
    sampling_shift=family_defaults.sampling_shift("flux2"),
    latents=Flux2Latents(),
    token_patch=1,
    dynamic_mu=dynamic_mu,
)
