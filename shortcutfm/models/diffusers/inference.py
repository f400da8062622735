"""Few-step sampling with a standard diffusers pipeline and an SCFM LoRA (docs/method.md, "Inference").

The pipeline runs plain Euler on our shifted N-step grid: a ``FlowMatchEulerDiscreteScheduler`` with ``shift=1``
and no dynamic shifting (otherwise it would shift our already shifted grid again) gets the grid as ``sigmas=``,
passed by the pipeline where its ``__call__`` takes ``sigmas`` and bound into the scheduler's ``set_timesteps``
for pipelines that call it with the step count only (Wan). The pipeline's own scheduler is put back afterwards.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ...core.grids import dynamic_shift_mu, sigma_grid
from .families import ModelFamily, family_of_pipeline

#: scheduler settings that make ``sigmas=`` the exact grid (no shift, no stretching, no conversions)
EXACT_GRID_SCHEDULER = dict(
    shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=False,
)


def sampling_grid(
    family: ModelFamily, num_steps: int, latent_height: int, latent_width: int, shift: float | str | None = None
) -> torch.Tensor:
    """The (num_steps + 1,) sigma grid; ``shift`` is a number, ``"dynamic"`` or None (the family default)."""
    shift = family.sampling_shift if shift is None else shift
    if shift == "dynamic":
        tokens = family.num_image_tokens(latent_height, latent_width)
        mu = dynamic_shift_mu(tokens) if family.dynamic_mu is None else family.dynamic_mu(tokens, num_steps)
        return sigma_grid(num_steps, mu=mu, dtype=torch.float64)
    if isinstance(shift, str):
        raise ValueError(f'shift must be a number or "dynamic", got {shift!r}')
    return sigma_grid(num_steps, float(shift), dtype=torch.float64)


@torch.no_grad()
def fuse_lora(pipe, adapter_name: str, lora_scale: float = 1.0):
    """Fold the loaded LoRA ``adapter_name`` into the base weights at ``lora_scale`` and drop the adapters, so that
    an N-step student costs N plain transformer passes (unfused, every LoRA layer adds two small matmuls and
    peft's dispatch). Sample the fused pipeline with ``lora_scale=1``. Returns ``pipe``."""
    pipe.fuse_lora(lora_scale=float(lora_scale), adapter_names=[adapter_name])
    pipe.unload_lora_weights()  # keeps the fused weights, removes the peft layers
    return pipe


def sample_with_pipeline(
    pipe,
    prompts: str | Sequence[str] | None = None,
    *,
    num_steps: int,
    shift: float | str | None = None,
    lora_scale: float = 1.0,
    guidance: float | None = None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "latent",
    **pipeline_kwargs,
):
    """Sample ``num_steps`` Euler steps on the shifted grid with ``pipe`` (a pipeline of a supported family).

    Args:
        pipe: a pipeline of a supported family, with the SCFM LoRA loaded (``pipe.load_lora_weights``).
        prompts: prompt(s); or None and pass ``prompt_embeds=`` etc. in ``pipeline_kwargs``.
        num_steps: Euler steps N (N network passes, 2N rows with real CFG).
        shift: grid shift, ``"dynamic"`` (Flux) or None for the family default.
        lora_scale: multiplies the active LoRA adapters for this call only (1 to 1.75 suits few steps).
        guidance: Flux: the embedded guidance value (default 3.5); CFG families: ``w`` of
            ``v_cond + w (v_cond - v_uncond)`` (default the family's; the pipeline gets ``w + 1``).
        latents: optional starting noise in the contract's latent layout ((B, C, H, W); Wan (B, C, F, H, W)).
        height, width: image size in pixels; derived from ``latents`` when given.
        output_type: "latent" returns (B, C, H, W) latents; any other value is passed to the pipeline and
            its ``images`` are returned.
        pipeline_kwargs: passed to the pipeline (e.g. ``max_sequence_length``, ``prompt_embeds``).
    """
    family = family_of_pipeline(pipe)
    if latents is not None:
        latent_height, latent_width = latents.shape[-2:]
        pipeline_kwargs = {**family.latents.pipeline_size(pipe, tuple(latents.shape[1:])), **pipeline_kwargs}
        height, width = pipeline_kwargs.pop("height"), pipeline_kwargs.pop("width")
        latents = family.to_pipeline_latents(latents)
    elif height is None or width is None:
        raise ValueError("pass latents=(B, C, H, W) noise, or both height= and width= in pixels")
    else:
        factor = family.latents.pixels_per_latent(pipe)
        latent_height, latent_width = height // factor, width // factor

    grid = sampling_grid(family, num_steps, latent_height, latent_width, shift)
    velocity_class = family.velocity_class
    name = velocity_class.pipeline_attention_kwargs_name or velocity_class.attention_kwargs_name
    attention_kwargs = dict(pipeline_kwargs.pop(name, None) or {})
    if lora_scale != 1.0:
        attention_kwargs["scale"] = float(lora_scale)
    kwargs = {**family.guidance.pipeline_kwargs(guidance), **pipeline_kwargs}
    if attention_kwargs:
        kwargs[name] = attention_kwargs

    sigmas = grid[:-1].tolist()
    if "sigmas" in inspect.signature(pipe.__call__).parameters:
        kwargs["sigmas"] = sigmas
    original_scheduler = pipe.scheduler
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(original_scheduler.config, **EXACT_GRID_SCHEDULER)
    scheduler.set_timesteps = functools.partial(scheduler.set_timesteps, sigmas=sigmas)
    pipe.scheduler = scheduler
    try:
        result = pipe(
            prompt=prompts, num_inference_steps=num_steps, height=height, width=width,
            latents=latents, generator=generator, output_type=output_type, return_dict=False, **kwargs,
        )[0]  # images, or Wan's frames
    finally:
        pipe.scheduler = original_scheduler
    if output_type == "latent":
        return family.latents.from_pipeline(pipe.vae, family.from_pipeline_latents(result, latent_height, latent_width))
    return result
