"""Training set-up for a diffusers model (Flux, SD3, Lumina 2) from a prepared latent cache.

* ``train.mode=distill``: an SCFM LoRA on the frozen pretrained transformer (:class:`LoraStudent`);
* ``train.mode=pretrain``: the transformer of ``model.pretrained``'s architecture trained from scratch, every
  weight (:class:`FullStudent`, no teacher), with caption dropout (``model.label_dropout``: the prompt replaced
  by the cached empty prompt) so that classifier-free guidance works. The run exports a complete pipeline
  folder: ``model.pretrained``'s other components with the trained transformer (its EMA weights).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Mapping

import torch

from ..config import Config
from ..models.diffusers import LoraStudent, export_lora, get_family
from ..models.student import FullStudent
from ..preparation import LatentCache
from ..preparation.buckets import BucketedCache, open_cache
from .setup import TrainingSetup
from .validation import lora_validation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CachedBatches:
    """:class:`~shortcutfm.training.setup.BatchSource` over a prepared :class:`LatentCache`."""

    def __init__(self, cache: LatentCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.cache.get(indices)
        latents = record.pop("latents").float()
        return latents, record


def caption_dropout(uncond: Mapping[str, torch.Tensor], probability: float):
    """Per-step cond transform: each sample's text tensors replaced by the empty prompt's with ``probability``."""

    def training_cond(cond: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if probability == 0.0:
            return cond
        reference = next(iter(cond.values()))
        drop = torch.rand(reference.shape[0], generator=generator) < probability
        out = dict(cond)
        for key, empty in uncond.items():
            if key in out:
                mask = drop.view(-1, *([1] * (out[key].ndim - 1)))
                out[key] = torch.where(mask, empty.to(out[key].dtype).expand_as(out[key]), out[key])
        return out

    return training_cond


def _open_cache(config: Config, family) -> LatentCache | BucketedCache:
    if not config.model.pretrained:
        raise ValueError(f"model.pretrained must name the {family.name} pipeline (local path or hub id)")
    cache = open_cache(Path(config.data.source))
    if cache.layout.family != family.name:
        raise ValueError(
            f"data.source {config.data.source} was prepared for {cache.layout.family!r}, but model.kind is "
            f"{family.name!r}; prepare the data with the same model"
        )
    return cache


def image_tokens(cache, family) -> int:
    """Latent tokens per sample (the dynamic shift's input); a bucketed cache's records-weighted mean (its buckets
    have about the same pixel count)."""
    if isinstance(cache, BucketedCache):
        return cache.mean_image_tokens(family.num_image_tokens)
    return family.num_image_tokens(*cache.get(torch.arange(1))["latents"].shape[-2:])


def export_pipeline(base_dir: Path, transformer: torch.nn.Module, directory: Path) -> None:
    """A pipeline folder: every component of the local pipeline ``base_dir`` but ``transformer/``, plus
    ``transformer`` saved with ``save_pretrained`` (safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    for item in base_dir.iterdir():
        if item.name == "transformer":
            continue
        target = directory / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    transformer.save_pretrained(directory / "transformer", safe_serialization=True)


def diffusers_pretrain_setup(config: Config) -> TrainingSetup:
    """The transformer of ``model.pretrained``'s architecture, randomly initialised (from the global seed the
    caller set), trained with every weight from the cache in ``data.source``."""
    family = get_family(config.model.kind)
    cache = _open_cache(config, family)
    base_dir = Path(config.model.pretrained)
    if not (base_dir / "model_index.json").is_file():
        raise ValueError(f"model.pretrained={config.model.pretrained!r}: train.mode=pretrain needs a local pipeline "
                         "folder (with model_index.json) whose transformer config it trains from scratch")
    transformer_config = family.transformer_class.load_config(base_dir / "transformer")
    transformer = family.transformer_class.from_config(transformer_config)
    if DTYPES[config.model.dtype] != torch.float32:
        transformer = transformer.to(DTYPES[config.model.dtype])
    velocity = family.velocity(transformer)
    velocity.set_gradient_checkpointing(config.model.gradient_checkpointing)
    student = FullStudent(velocity, config.ema, teacher=False)

    def export(directory: Path, source: str) -> None:
        trained = copy.deepcopy(transformer)
        if source == "ema":
            prefix = "transformer."
            shadow = {name[len(prefix):]: tensor for name, tensor in student.emas.slow.shadow.items()}
            missing = set(dict(trained.named_parameters())) - set(shadow)
            if missing:
                raise RuntimeError(f"the EMA lacks {sorted(missing)[:3]}")
            trained.load_state_dict(shadow, strict=False)
        export_pipeline(base_dir, trained, directory)

    return TrainingSetup(
        student=student,
        data=CachedBatches(cache),
        training_cond=caption_dropout(cache.uncond, config.model.label_dropout),
        num_tokens=image_tokens(cache, family),
        allow_teacher=False,
        evaluate=None,
        export=export,
    )


def diffusers_setup(config: Config) -> TrainingSetup:
    """LoRA student on the frozen pretrained transformer, trained from the cache in ``data.source``
    (``train.mode=pretrain``: :func:`diffusers_pretrain_setup`)."""
    if config.train.mode == "pretrain":
        return diffusers_pretrain_setup(config)
    family = get_family(config.model.kind)
    cache = _open_cache(config, family)
    student = LoraStudent.from_pretrained(
        family,
        config.model.pretrained,
        lora=config.lora,
        schedule=config.ema,
        dtype=DTYPES[config.model.dtype],
        quantize=config.model.quantize,
        uncond=cache.uncond,
        guidance_scale=config.model.guidance_scale,
        fold_guidance=config.model.fold_guidance,
        gradient_checkpointing=config.model.gradient_checkpointing,
    )

    def export(directory: Path, source: str) -> None:
        export_lora(student, directory, include_ema=True)

    validation = lora_validation(config, student, cache) if config.eval.every or config.validation.enabled else None
    return TrainingSetup(
        student=student,
        data=CachedBatches(cache),
        training_cond=student.training_cond,
        num_tokens=image_tokens(cache, family),
        allow_teacher=True,
        evaluate=validation.evaluate if validation is not None and config.eval.every else None,
        export=export,
        validate=validation.grid if validation is not None and config.validation.enabled else None,
    )
