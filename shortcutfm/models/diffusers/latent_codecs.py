"""How a family's pipeline maps pixels to the latents its transformer denoises, and back (a *latent codec*).

The velocity contract's ``latents`` are in the layout a family's pipeline denoises in, after the VAE's
normalisation: what :mod:`shortcutfm.preparation` caches, what the samplers start from as noise, and what the
validation grids decode. The codec is the one place that knows that layout for a family:

* :class:`ScaledVAE` (FLUX.1, SD3, Lumina 2): ``(vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor``,
  (B, C, H/f, W/f);
* :class:`NormalizedVideoVAE` (Qwen-Image, Wan): a 3-D VAE normalised by ``latents_mean`` / ``latents_std``;
* the patchified, batch-normalised latents of FLUX.2 have a codec of their own (its family module).

Pixels are (B, 3, H, W) in [-1, 1] (the pipelines' ``image_processor`` range) and decoded pixels are returned
in the same range, float32 on the CPU (a video codec returns its first frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScaledVAE:
    """Latents ``(B, C, H/f, W/f)`` = ``(mean - shift_factor) * scaling_factor`` of a 2-D ``AutoencoderKL``."""

    def pixels_per_latent(self, pipe) -> int:
        """Pixels per latent cell along height and width (the VAE's downsampling factor)."""
        return int(pipe.vae_scale_factor)

    def default_size(self, pipe) -> tuple[int, int]:
        """The pipeline's default (height, width) in pixels."""
        size = int(pipe.default_sample_size) * self.pixels_per_latent(pipe)
        return size, size

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, ...]:
        """The shape of one latent, without the batch, for an image of ``height`` x ``width`` pixels."""
        factor = self.pixels_per_latent(pipe)
        return int(pipe.vae.config.latent_channels), height // factor, width // factor

    def pipeline_size(self, pipe, latent_shape: tuple[int, ...]) -> dict[str, int]:
        """The size arguments of ``pipe(...)`` (``height``, ``width``, ...) that make latents of ``latent_shape``."""
        factor = self.pixels_per_latent(pipe)
        return {"height": int(latent_shape[-2]) * factor, "width": int(latent_shape[-1]) * factor}

    def from_pipeline(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result, unpacked, -> the contract's layout (here: the same)."""
        return latents

    @torch.no_grad()
    def encode(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> latents, from the mean of the latent distribution (no sampling noise)."""
        mean = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        return (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, H, W) pixels in [-1, 1], float32 on the CPU."""
        param = next(vae.parameters())
        latents = latents.to(param.device, param.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(latents).sample.float().cpu()


SCALED_VAE = ScaledVAE()


@dataclass(frozen=True)
class NormalizedVideoVAE(ScaledVAE):
    """A video-style 3-D VAE (Qwen-Image, Wan) normalised per channel: ``(mean - latents_mean) / latents_std``.

    ``keep_frames``: the contract's latents keep the frame axis, (B, C, F, H/f, W/f) (Wan video); otherwise an
    image is a one-frame video and its latents are (B, C, H/f, W/f) (Qwen-Image). Images encode as one frame.
    """

    keep_frames: bool = False

    def pixels_per_latent(self, pipe) -> int:
        return int(getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor)

    def default_size(self, pipe) -> tuple[int, int]:
        import inspect

        parameters = inspect.signature(pipe.__call__).parameters
        height, width = parameters["height"].default, parameters["width"].default
        if isinstance(height, int) and isinstance(width, int):  # Wan: 480 x 832
            return height, width
        return super().default_size(pipe)

    def latent_shape(self, pipe, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        factor = self.pixels_per_latent(pipe)
        spatial = (height // factor, width // factor)
        channels = int(pipe.vae.config.z_dim)
        return (channels, frames, *spatial) if self.keep_frames else (channels, *spatial)

    def pipeline_size(self, pipe, latent_shape: tuple[int, ...]) -> dict[str, int]:
        size = super().pipeline_size(pipe, latent_shape)
        if self.keep_frames:  # a causal video VAE: latent frame 0 is one frame, each further one `temporal` frames
            size["num_frames"] = (int(latent_shape[-3]) - 1) * int(pipe.vae_scale_factor_temporal) + 1
        return size

    @staticmethod
    def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    @torch.no_grad()
    def encode(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        video = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)  # (B, 3, 1, H, W)
        latents = vae.encode(video).latent_dist.mean
        mean, std = self._stats(vae, latents)
        latents = (latents - mean) / std
        return latents if self.keep_frames else latents[:, :, 0]

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        latents = latents.to(param.device, param.dtype)
        latents = latents if self.keep_frames else latents.unsqueeze(2)
        mean, std = self._stats(vae, latents)
        return vae.decode(latents * std + mean).sample[:, :, 0].float().cpu()
