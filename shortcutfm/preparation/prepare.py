"""``shortcutfm prepare``: encode training data once, so training needs neither VAE nor text encoders.

Two sources, one cache format (:mod:`.cache`):

* :func:`prepare_from_prompts`: the teacher pipeline samples each prompt (``output_type="latent"``, so nothing
  is decoded and re-encoded), as the SCFM authors do (docs/method.md, "Data");
* :func:`prepare_from_folder`: a user's images with captions, VAE-encoded at a fixed resolution.

Both skip records whose content key is already cached and write the good records even when some inputs fail.
Bad inputs (unreadable image, missing caption, image smaller than the resolution) are collected; with
``on_error="raise"`` (the default: training on fewer images than the user gave should not pass silently) the
run still encodes and caches every good input, then raises one :class:`PreparationError` listing every bad
file, so one fix-and-re-run encodes only the fixed files. ``on_error="skip"`` logs them and returns the report.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

import torch
from tqdm.auto import tqdm

from .cache import CacheLayout, RecordInfo, content_key
from .encode import (
    encode_images,
    encode_text,
    encode_uncond,
    pipeline_default,
    pipeline_family,
    pixel_multiple,
    teacher_latents_to_vae_layout,
)
from .inputs import ImageCaption, list_image_captions, read_prompt_file
from .report import FailedInput, PreparationError, PreparationReport
from .writer import CacheWriter

if TYPE_CHECKING:  # PIL (the diffusers extra) is imported only when images are prepared
    from PIL import Image

logger = logging.getLogger(__name__)
OnError = Literal["raise", "skip"]
# Arguments prepare_from_prompts sets itself, or that would make the teacher see other text embeddings than
# the ones cached for its samples; pipeline_kwargs may not set them.
_TEACHER_OWNED_ARGS = {"prompt", "height", "width", "num_inference_steps", "guidance_scale", "generator",
                       "output_type", "return_dict", "max_sequence_length", "num_images_per_prompt", "latents",
                       "prompt_2", "prompt_3", "prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask",
                       "system_prompt", "clip_skip"}


def prompt_seed(base_seed: int, prompt: str, sample_index: int = 0) -> int:
    """Noise seed of one teacher sample: from its prompt, not its line number, so reordering changes nothing."""
    digest = content_key(int(base_seed).to_bytes(8, "little", signed=True), prompt, {"sample_index": sample_index})
    return int(digest[:15], 16)


def resolve_layout(pipe, height: int | None, width: int | None, max_sequence_length: int | None,
                   model_id: str | None) -> CacheLayout:
    """The cache layout for ``pipe``; ``None`` means the pipeline's default. Validates every value."""
    family = pipeline_family(pipe)
    multiple = pixel_multiple(pipe)
    default_height, default_width = family.latents.default_size(pipe)
    sizes = {"height": default_height if height is None else height, "width": default_width if width is None else width}
    for name, size in sizes.items():
        if not isinstance(size, int) or size <= 0 or size % multiple:
            raise ValueError(
                f"{name}={size!r} must be a positive multiple of {multiple} for this {family.name} pipeline"
            )
    model_id = model_id or pipe.name_or_path
    if not model_id:
        raise ValueError("pass model_id=...: this pipeline was not loaded from a hub id or a path, so the cache "
                         "cannot record which model encoded it")
    max_len = pipeline_default(pipe, "max_sequence_length") if max_sequence_length is None else max_sequence_length
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_sequence_length must be a positive integer, got {max_len!r}")
    return CacheLayout(family.name, str(model_id), sizes["height"], sizes["width"], max_len)


def _ensure_uncond(pipe, writer: CacheWriter, layout: CacheLayout) -> None:
    if not writer.has_uncond:
        writer.write_uncond(encode_uncond(pipe, layout.max_sequence_length))


def _add_batch(writer: CacheWriter, records: list[RecordInfo], latents: torch.Tensor, text: Mapping) -> None:
    for index, record in enumerate(records):
        writer.add(record, {"latents": latents[index], **{name: tensor[index] for name, tensor in text.items()}})


def _finish(report: PreparationReport, num_records: int, on_error: OnError) -> PreparationReport:
    report.num_records = num_records
    if report.failed and on_error == "raise":
        raise PreparationError(report)
    if report.failed:
        logger.warning("%s", report.summary())
    return report


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _check_positive(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class UnsupportedImage(ValueError):
    """An image that opens but has no faithful 8-bit RGB reading."""


_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image the VAE sees, from any mode Pillow opens.

    * camera orientation (EXIF) applied, as diffusers' ``load_image`` does;
    * 16-bit grey (``I;16``, or ``I`` as Pillow opens 16-bit PNGs) scaled to 8 bits (``v / 257``): Pillow's own
      conversion clips every value above 255 to white;
    * transparency (RGBA, LA, palette or RGB with a transparent colour) composited on white, the usual reading
      of a transparent background (dropping the alpha would show whatever colour the hidden pixels store);
    * CMYK, palette, grey and 1-bit images by Pillow's conversion (CMYK without colour management);
    * 32-bit float images are refused (no agreed range).
    """
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        raise UnsupportedImage("is a 32-bit floating-point image, which has no agreed 8-bit range; save it as an "
                               "8- or 16-bit PNG")
    if image.mode in _SIXTEEN_BIT_GREY:
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _load_image(item: ImageCaption, settings: Mapping[str, Any], layout: CacheLayout, allow_upscale: bool,
                writer: CacheWriter, report: PreparationReport) -> tuple[RecordInfo, Image.Image] | None:
    """The record and RGB image of one folder item, or ``None`` (counted in ``report``) if cached or bad."""
    if item.caption is None:
        report.failed.append(FailedInput(item.relative_name, item.missing_caption_hint))
        return None
    try:
        image_bytes = item.image_path.read_bytes()
    except OSError as error:
        report.failed.append(FailedInput(item.relative_name, f"cannot be read ({error})"))
        return None
    key = content_key(image_bytes, item.caption, settings)
    if writer.has(key):
        report.already_cached += 1
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as opened:
            image = to_rgb(opened)
    except UnsupportedImage as error:
        report.failed.append(FailedInput(item.relative_name, str(error)))
        return None
    except Exception as error:  # PIL raises many types for truncated/garbled files
        report.failed.append(FailedInput(item.relative_name, f"is not a readable image ({type(error).__name__}: "
                                                             f"{error}); replace or remove the file"))
        return None
    if not allow_upscale and (image.width < layout.width or image.height < layout.height):
        report.failed.append(FailedInput(item.relative_name, f"is {image.width}x{image.height} pixels, smaller than "
                                         f"the {layout.width}x{layout.height} resolution; use a larger image, a "
                                         "smaller resolution, or allow_upscale=True"))
        return None
    return RecordInfo(key, item.caption, item.relative_name), image


def prepare_from_folder(pipe, folder: str | Path, out_dir: str | Path, *, height: int | None = None,
                        width: int | None = None, on_error: OnError = "raise", allow_upscale: bool = False,
                        batch_size: int = 4, max_sequence_length: int | None = None, model_id: str | None = None,
                        records_per_shard: int = 256, buckets: bool = False, rank: int = 0, world_size: int = 1,
                        show_progress: bool = True) -> PreparationReport:
    """Cache the VAE latents (resize + center crop to ``height x width``, latent mean) and caption embeddings of
    the images in ``folder`` (see :mod:`.inputs` for the caption conventions) into ``out_dir``.

    ``height``/``width`` default to the pipeline's default resolution; ``model_id`` to ``pipe.name_or_path``.
    ``buckets``: aspect-ratio buckets of about ``height * width`` pixels, one cache per bucket under ``out_dir``
    (:mod:`.buckets`); each image goes to the bucket nearest its aspect ratio. ``rank``/``world_size``: this
    process's share of a multi-process run, written to its part cache (:mod:`.parts`; merge with ``merge_parts``).
    Raises :class:`PreparationError` after caching the good images if some failed and ``on_error="raise"``."""
    _check_on_error(on_error)
    _check_positive(batch_size=batch_size)
    layout = resolve_layout(pipe, height, width, max_sequence_length, model_id)
    items = list_image_captions(folder)
    target, known = _share_target(out_dir, rank, world_size)
    if not buckets:
        report = PreparationReport(Path(out_dir))
        writer = _prepare_items(pipe, items[rank::world_size], folder, target, layout, report,
                                allow_upscale=allow_upscale, batch_size=batch_size, records_per_shard=records_per_shard,
                                show_progress=show_progress, known_keys=known)
        return _finish(report, writer.num_records, on_error)
    if world_size > 1:
        raise ValueError("--buckets runs in one process (launch prepare without torchrun for a bucketed cache)")
    from .buckets import bucket_dir_name, bucket_sizes, nearest_bucket, write_bucket_index

    sizes = bucket_sizes(layout.height, layout.width, pixel_multiple(pipe))
    groups: dict[tuple[int, int], list[ImageCaption]] = {}
    for item in items:
        groups.setdefault(nearest_bucket(*_image_size(item.image_path, layout), sizes), []).append(item)
    report, total = PreparationReport(Path(out_dir)), 0
    for (bucket_height, bucket_width), group in sorted(groups.items()):
        bucket_layout = CacheLayout(layout.family, layout.model_id, bucket_height, bucket_width, layout.max_sequence_length)
        writer = _prepare_items(pipe, group, folder, Path(out_dir) / bucket_dir_name(bucket_height, bucket_width),
                                bucket_layout, report, allow_upscale=allow_upscale, batch_size=batch_size,
                                records_per_shard=records_per_shard, show_progress=show_progress)
        total += writer.num_records
    used = sorted(groups) + _existing_buckets(Path(out_dir), sizes, exclude=set(groups))
    write_bucket_index(Path(out_dir), used)
    return _finish(report, total, on_error)


def _image_size(path: Path, layout: CacheLayout) -> tuple[int, int]:
    """(height, width) as the VAE will see the image (EXIF orientation applied); the layout's if unreadable (the
    failure is then reported when the image is encoded)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            width, height = ImageOps.exif_transpose(image).size
            return height, width
    except Exception:  # PIL raises many types for garbled files; _load_image reports them
        return layout.height, layout.width


def _existing_buckets(out_dir: Path, sizes: list[tuple[int, int]], exclude: set) -> list[tuple[int, int]]:
    """Buckets an earlier run of the same folder filled that this run did not touch (all their images cached)."""
    from .buckets import bucket_dir_name

    return [size for size in sizes if size not in exclude and (out_dir / bucket_dir_name(*size)).is_dir()]


def _share_target(out_dir, rank: int, world_size: int) -> tuple[Path, set[str]]:
    """Where this process writes and which records the merged cache already holds (multi-process runs)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank {rank!r} must be in [0, world_size={world_size!r})")
    if world_size == 1:
        return Path(out_dir), set()
    from .parts import held_keys, part_dir

    return part_dir(out_dir, rank), held_keys(out_dir)


def _prepare_items(pipe, items: list[ImageCaption], folder, out_dir, layout: CacheLayout, report: PreparationReport, *,
                   allow_upscale: bool, batch_size: int, records_per_shard: int, show_progress: bool,
                   known_keys: set[str] = frozenset()) -> CacheWriter:
    settings = {"source": "folder", **asdict(layout), "latents": "vae_latent_mean"}
    with CacheWriter(out_dir, layout, {**settings, "folder": str(folder)}, records_per_shard, known_keys) as writer:
        _ensure_uncond(pipe, writer, layout)
        batch: list[tuple[RecordInfo, Image.Image]] = []
        for position, item in enumerate(tqdm(items, desc="encoding images", disable=not show_progress)):
            loaded = _load_image(item, settings, layout, allow_upscale, writer, report)
            batch += [loaded] if loaded else []
            if batch and (len(batch) == batch_size or position == len(items) - 1):
                records = [record for record, _ in batch]
                latents = encode_images(pipe, [image for _, image in batch], layout.height, layout.width)
                text = encode_text(pipe, [record.caption for record in records], layout.max_sequence_length)
                _add_batch(writer, records, latents, text)
                report.added += len(batch)
                batch = []
    return writer


def prepare_from_prompts(pipe, prompt_file: str | Path, out_dir: str | Path, *, num_steps: int = 32,
                         height: int | None = None, width: int | None = None, guidance_scale: float | None = None,
                         seed: int = 0, samples_per_prompt: int = 1, batch_size: int = 4,
                         max_sequence_length: int | None = None, model_id: str | None = None,
                         pipeline_kwargs: Mapping[str, Any] | None = None, records_per_shard: int = 256,
                         rank: int = 0, world_size: int = 1, show_progress: bool = True) -> PreparationReport:
    """Sample the teacher ``pipe`` on every prompt of ``prompt_file`` (``num_steps`` steps, the pipeline's own
    schedule) and cache the final latents with the prompt embeddings into ``out_dir``.

    Sample ``i`` of a prompt uses ``torch.Generator("cpu").manual_seed(prompt_seed(seed, prompt, i))``; the stored
    latents equal ``pipe(prompt, generator=that, output_type="latent", ...)`` (Flux's unpacked to (C, H, W)).
    ``guidance_scale=None`` uses the pipeline's default; ``pipeline_kwargs`` go to ``pipe(...)`` as they are
    (JSON-able values only, they are part of the records' keys). Duplicate prompts count as already cached.
    ``rank``/``world_size``: this process takes every ``world_size``-th prompt sample from position ``rank`` into
    its part cache (:mod:`.parts`; ``merge_parts`` merges the parts into ``out_dir``)."""
    prompts = read_prompt_file(prompt_file)
    layout = resolve_layout(pipe, height, width, max_sequence_length, model_id)
    _check_positive(num_steps=num_steps, samples_per_prompt=samples_per_prompt, batch_size=batch_size)
    extra = dict(pipeline_kwargs or {})
    if _TEACHER_OWNED_ARGS & extra.keys():
        raise ValueError(f"pipeline_kwargs may not set {sorted(_TEACHER_OWNED_ARGS & extra.keys())}; use the arguments")
    guidance = pipeline_family(pipe).guidance
    scale_argument = guidance.scale_argument  # the pipeline's own name (Qwen-Image: true_cfg_scale)
    if scale_argument in extra:
        raise ValueError(f"pipeline_kwargs may not set {scale_argument!r}; use guidance_scale")
    if guidance_scale is None:
        guidance_scale = pipeline_default(pipe, scale_argument)
    try:
        json.dumps(extra)
    except TypeError as error:
        raise ValueError(f"pipeline_kwargs must be JSON-able (they are part of each record's key): {error}") from None
    settings = {"source": "teacher", **asdict(layout), "num_steps": num_steps,
                "guidance_scale": float(guidance_scale), "pipeline_kwargs": extra}
    report = PreparationReport(Path(out_dir))
    target, known = _share_target(out_dir, rank, world_size)
    units = [(prompt, sample_index) for prompt in prompts for sample_index in range(samples_per_prompt)]
    with CacheWriter(target, layout, settings, records_per_shard, known) as writer:
        _ensure_uncond(pipe, writer, layout)
        todo: list[RecordInfo] = []
        todo_keys: set[str] = set()
        for prompt, sample_index in units[rank::world_size]:
            noise_seed = prompt_seed(seed, prompt, sample_index)
            key = content_key(noise_seed.to_bytes(8, "little"), prompt, settings)
            if writer.has(key) or key in todo_keys:
                report.already_cached += 1
            else:
                todo.append(RecordInfo(key, prompt, "teacher", noise_seed))
                todo_keys.add(key)
        progress = tqdm(total=len(todo), desc="sampling the teacher", disable=not show_progress)
        for start in range(0, len(todo), batch_size):
            records = todo[start:start + batch_size]
            captions = [record.caption for record in records]
            generators = [torch.Generator("cpu").manual_seed(record.seed) for record in records]
            output = pipe(prompt=captions, height=layout.height, width=layout.width, num_inference_steps=num_steps,
                          generator=generators, output_type="latent", max_sequence_length=layout.max_sequence_length,
                          return_dict=False, **{scale_argument: guidance_scale, **guidance.teacher_kwargs(), **extra})[0]
            latents = teacher_latents_to_vae_layout(pipe, output, layout.height, layout.width)
            _add_batch(writer, records, latents, encode_text(pipe, captions, layout.max_sequence_length))
            report.added += len(records)
            progress.update(len(records))
        progress.close()
    return _finish(report, writer.num_records, "raise")
