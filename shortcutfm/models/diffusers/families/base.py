"""What every diffusers model family provides: a velocity adapter and a description (:class:`ModelFamily`).

An adapter wraps a diffusers transformer so that ``v = adapter(latents, sigma, **cond)`` follows the one
velocity contract of :mod:`shortcutfm.core.velocity`:

* ``latents``: (B, C, H, W) in the layout the pipeline's VAE produces, after its scaling/shift factors;
* ``sigma``: (B,) in [0, 1], 1 = noise, 0 = data;
* ``cond``: per-sample tensors with the batch first, named like the cached data (``prompt_embeds`` ...);
* returns (B, C, H, W), ``d x_sigma / d sigma`` (``noise - x0`` on straight paths), in ``latents``' dtype.

All conversions (x1000 timesteps, inverted time, latent packing, sign flips) happen inside the adapter, and
each one has a test in ``tests/test_diffusers_adapters.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

from ....core.jumps import JumpSampling
from ..guidance import EmbeddedGuidance, RealGuidance
from ..latent_codecs import SCALED_VAE, ScaledVAE

Cond = dict[str, torch.Tensor]


def check_latents(latents: torch.Tensor, sigma: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate the contract's shapes; return ``(B, C, H, W)``."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, H, W) VAE latents, got shape {tuple(latents.shape)}")
    if sigma.shape != (latents.shape[0],):
        raise ValueError(f"sigma must have shape ({latents.shape[0]},), got {tuple(sigma.shape)}")
    return tuple(latents.shape)


class DiffusersVelocity(nn.Module):
    """Base class of the family adapters: holds ``transformer`` and the LoRA scale of its forward passes.

    Args:
        transformer: the diffusers denoiser (``FluxTransformer2DModel``, ...), possibly with peft adapters.
        lora_scale: multiplies the active LoRA adapters' weights in every forward pass (1 = as trained).
    """

    #: name of the transformer's keyword argument that carries ``{"scale": lora_scale}``
    attention_kwargs_name: ClassVar[str] = "joint_attention_kwargs"
    #: the pipeline's name for it, where it differs (FLUX.2: ``attention_kwargs``)
    pipeline_attention_kwargs_name: ClassVar[str | None] = None

    def __init__(self, transformer: nn.Module, lora_scale: float = 1.0):
        super().__init__()
        self.transformer = transformer
        self.lora_scale = float(lora_scale)

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype of the frozen base weights (LoRA weights may be float32 on a bfloat16 base)."""
        for name, param in self.transformer.named_parameters():
            if "lora_" not in name and param.is_floating_point():
                return param.dtype
        raise RuntimeError("the transformer has no floating-point base parameters")

    def lora_kwargs(self) -> dict:
        """``{attention_kwargs_name: {"scale": s}}`` when the LoRA scale is not 1, else ``{}``."""
        if self.lora_scale == 1.0:
            return {}
        return {self.attention_kwargs_name: {"scale": self.lora_scale}}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the transformer blocks in the backward pass (less memory, ~30% more compute)."""
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class PromptEncoding:
    """Prompt embeddings as the adapter's cond keys: ``cond`` (B, ...) and ``uncond`` (1, ...) or None.

    ``uncond`` is the encoding of the empty negative prompt, exactly as the family's pipeline makes it for
    classifier-free guidance (None for families without real guidance).
    """

    cond: Cond
    uncond: Cond | None


def identity_latents(latents: torch.Tensor) -> torch.Tensor:
    return latents


def identity_unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return latents


@dataclass(frozen=True)
class ModelFamily:
    """Everything the library needs to know about one diffusers model family.

    Shift fields take a number (a fixed shift ``s``) or ``"dynamic"`` (Flux's resolution-dependent shift).
    """

    name: str
    velocity_class: type[DiffusersVelocity]
    transformer_class: type
    pipeline_class: type
    cond_keys: tuple[str, ...]
    """Cached-data keys the adapter needs (besides ``guidance`` added by :meth:`training_cond`)."""
    lora_target_modules: tuple[str, ...]
    """Default LoRA targets, as peft module-name suffixes (nearly every linear layer; docs/method.md)."""
    guidance: EmbeddedGuidance | RealGuidance
    encode_prompts: Callable[..., PromptEncoding]
    """``encode_prompts(pipe, prompts, max_sequence_length) -> PromptEncoding`` via the pipeline's encoders."""
    shift_range: tuple[float, float] = (2.5, 4.5)
    alt_shift: float | str = 3.0
    sampling_shift: float | str = 3.0
    to_pipeline_latents: Callable[[torch.Tensor], torch.Tensor] = field(default=identity_latents)
    """(B, C, H, W) -> the layout the pipeline's ``latents=`` argument takes (Flux: packed 2x2 tokens)."""
    from_pipeline_latents: Callable[[torch.Tensor, int, int], torch.Tensor] = field(default=identity_unpack)
    """The pipeline's ``output_type="latent"`` result -> (B, C, H, W), given the latent H and W."""
    latents: ScaledVAE = SCALED_VAE
    """The latent codec: pixels <-> the contract's latents, sizes (:mod:`..latent_codecs`)."""
    token_patch: int = 2
    """Latent cells per image token along each side (2: 2x2 patches; 1: the latents are already patchified)."""
    dynamic_mu: Callable[[int, int], float] | None = None
    """``(image tokens, steps) -> mu`` of the ``"dynamic"`` shift ``exp(mu)``; None: FLUX.1's rule (tokens only)."""

    def velocity(self, transformer: nn.Module, lora_scale: float = 1.0) -> DiffusersVelocity:
        """Wrap ``transformer`` in this family's velocity adapter."""
        return self.velocity_class(transformer, lora_scale=lora_scale)

    def num_image_tokens(self, latent_height: int, latent_width: int) -> int:
        """Image tokens of a latent (``token_patch`` x ``token_patch`` patches): input of the dynamic shift."""
        return (latent_height // self.token_patch) * (latent_width // self.token_patch)

    def jump_sampling(self, **overrides) -> JumpSampling:
        """:class:`JumpSampling` with this family's shift defaults; ``overrides`` replace any field."""
        values = {"shift_range": self.shift_range, "alt_shift": self.alt_shift}
        values.update(overrides)
        return JumpSampling(**values)

    def training_cond(self, cond: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> Cond:
        """Cond of a training batch with the family's per-sample extras (Flux: guidance ~ U[0, 7.5))."""
        return self.guidance.training_cond(cond, generator)

    def sampling_cond(self, cond: Mapping[str, torch.Tensor], value: float | None = None) -> Cond:
        """Cond for sampling (Flux: a fixed guidance, default 3.5); unchanged for real-guidance families."""
        return self.guidance.sampling_cond(cond, value)
