"""Data preparation: encode images / teacher samples and captions once into a :class:`LatentCache`, so that
training on a diffusers model needs neither its VAE nor its text encoders in memory.

Layout and key names: :mod:`.cache`. Encoding (through the family registry
``shortcutfm.models.diffusers.FAMILIES``): :mod:`.encode`.
Input conventions (prompt files, image folders with captions): :mod:`.inputs`.
"""

from .cache import CacheError, CacheLayout, LatentCache, RecordInfo, content_key
from .encode import encode_images, encode_text, encode_uncond, pipeline_family, teacher_latents_to_vae_layout
from .inputs import ImageCaption, list_image_captions, read_prompt_file
from .prepare import prepare_from_folder, prepare_from_prompts, prompt_seed, resolve_layout
from .report import FailedInput, PreparationError, PreparationReport
from .writer import CacheWriter

__all__ = [
    "CacheError",
    "CacheLayout",
    "CacheWriter",
    "FailedInput",
    "ImageCaption",
    "LatentCache",
    "PreparationError",
    "PreparationReport",
    "RecordInfo",
    "content_key",
    "encode_images",
    "encode_text",
    "encode_uncond",
    "pipeline_family",
    "list_image_captions",
    "prepare_from_folder",
    "prepare_from_prompts",
    "prompt_seed",
    "read_prompt_file",
    "resolve_layout",
    "teacher_latents_to_vae_layout",
]
