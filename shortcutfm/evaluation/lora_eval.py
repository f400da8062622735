"""``shortcutfm eval`` for any diffusers pipeline plus an SCFM LoRA: FID, CLIP score and seconds per image.

For a prompt list, the stock pipeline samples the teacher (no LoRA) at ``teacher_steps`` Euler steps and the
student (the LoRA fused in at its scale) at each of ``steps``, all from the same noise per prompt. Metrics (rows
of ``metrics.json`` as everywhere: model, sampler, steps, nfe, shift, metric, value):

* ``fid_teacher``: FID of the model's images against the teacher's ``teacher_steps``-step images of the same
  prompts and noise (the paper's "FID vs teacher" column);
* ``fid_reference``: FID against a folder of reference images (resized to the sampling size), when given;
* ``clip_score``: torchmetrics' CLIP score (100 x cosine of image and prompt embeddings), when a CLIP model is given;
* ``seconds_per_image``: wall time of the pipeline call per image, text encoding and VAE decoding included.

FID uses torchmetrics' ``FrechetInceptionDistance``: by default the 2048-d Inception-v3 pool features, whose
weights torch-fidelity fetches once into the torch hub cache (or pass ``inception_weights``); any ``nn.Module``
with a ``num_features`` attribute can replace it (the tests pass a small one). With few prompts FID is biased
upwards (it estimates a covariance from the samples): compare rows of one report, not across prompt counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import write_text_atomic
from .report import markdown_table, plot_metric_vs_steps, write_metrics
from .sweep import MetricRow

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LoraEvalSettings:
    """What one evaluation samples; written beside its report as ``eval_settings.json``."""

    pipeline: str
    lora_dir: str
    prompts: list[str]
    steps: tuple[int, ...] = (1, 2, 3, 4, 8)
    teacher_steps: int = 32
    shift: float | str | None = None  # None: the family's sampling shift
    guidance: float | None = None  # CFG w (Flux: the embedded guidance value); None: the family's default
    student_guidance: float | None = None  # the student's (None: ``guidance``; 0: guidance folded into the LoRA)
    lora_scale: float | None = None
    """The LoRA scale of every student row; None: each step count's calibrated scale (1 if uncalibrated)."""
    seed: int = 1234
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    batch_size: int = 8
    reference_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prompts) < 2:
            raise ValueError(f"the evaluation needs at least two prompts (FID needs two images), got "
                             f"{len(self.prompts)}: a prompt file with one prompt per line")
        if not self.steps or any(n < 1 for n in self.steps) or self.teacher_steps < 1:
            raise ValueError(f"step counts must be >= 1, got steps={self.steps} teacher_steps={self.teacher_steps}")


class _TensorFeatures(nn.Module):
    """A CLIP model whose ``get_image_features``/``get_text_features`` return tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` there (the projected embedding is its
    ``pooler_output``), which torchmetrics 1.9's CLIP score cannot normalise; this shim is the only change."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_loader(name_or_path: str) -> Callable[[], tuple[nn.Module, object]]:
    """A torchmetrics CLIP-score loader for a local CLIP folder or hub id (e.g. openai/clip-vit-large-patch14)."""

    def load():
        from transformers import CLIPModel, CLIPProcessor

        return _TensorFeatures(CLIPModel.from_pretrained(name_or_path).eval()), CLIPProcessor.from_pretrained(name_or_path)

    return load


def inception_features(weights: str | None = None) -> int:
    """torchmetrics' Inception-v3 pool features (2048); a one-line error when torch-fidelity or the weights file
    is missing."""
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError("FID with Inception-v3 needs torch-fidelity: pip install torch-fidelity (it downloads the "
                         "weights once; offline, pass --inception-weights FILE), or give --no-fid")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"--inception-weights {weights}: file not found")
    return 2048


def frechet_distance(fake: torch.Tensor, real: torch.Tensor, features: int | nn.Module,
                     inception_weights: str | None = None) -> float:
    """torchmetrics FID between two image batches in [0, 1] (B, 3, H, W); ``features`` is an Inception feature
    size (with torch-fidelity; ``inception_weights`` a local weights file) or an extractor module."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    extra = {"feature_extractor_weights_path": inception_weights} if isinstance(features, int) and inception_weights else {}
    metric = FrechetInceptionDistance(feature=features, normalize=True, **extra)
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    return float(metric.compute())


def load_reference_images(folder: Path, height: int, width: int) -> torch.Tensor:
    """Every image of ``folder`` (sorted), RGB, resized (centre crop to the aspect, then bicubic) to (H, W), in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    from ..preparation.prepare import to_rgb

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"reference folder {folder} holds {len(files)} images; FID needs at least two")
    images = []
    for path in files:
        with Image.open(path) as image:
            rgb = ImageOps.fit(to_rgb(image), (width, height), Image.Resampling.BICUBIC)
            images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(images)


@dataclass
class LoraEvalReport:
    rows: list[MetricRow]
    out_dir: Path
    markdown: str
    images: dict[tuple[str, int], torch.Tensor] = field(repr=False, default_factory=dict)  # (model, steps) -> [0, 1]


def _sample(pipe, settings: LoraEvalSettings, noise: torch.Tensor, steps: int,
            guidance: float | None) -> tuple[torch.Tensor, float]:
    from ..models.diffusers import sample_with_pipeline

    images, seconds = [], 0.0
    extra = {"max_sequence_length": settings.max_sequence_length} if settings.max_sequence_length else {}
    for start in range(0, len(settings.prompts), settings.batch_size):
        rows = slice(start, start + settings.batch_size)
        device = pipe.transformer.device
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        out = sample_with_pipeline(pipe, settings.prompts[rows], num_steps=steps, shift=settings.shift,
                                   guidance=guidance, latents=noise[rows].to(device, pipe.transformer.dtype),
                                   output_type="pt", **extra)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - began
        if out.ndim == 5:  # a video model's (B, F, 3, H, W): each video is scored by its first frame
            out = out[:, 0]
        images.append(out.float().cpu())
    return torch.cat(images).clamp(0, 1), seconds / len(settings.prompts)


def evaluate_lora(settings: LoraEvalSettings, out_dir: Path, *, fid_features: int | nn.Module | None = 2048,
                  inception_weights: str | None = None, clip: str | Callable | None = None, pipe=None,
                  progress: bool = True) -> LoraEvalReport:
    """Sample teacher and student as the module docstring says, score them, write the report into ``out_dir``.

    ``fid_features``: 2048 (Inception-v3 through torch-fidelity), an ``nn.Module`` feature extractor, or None (no
    FID). ``clip``: a CLIP folder / hub id, or a torchmetrics loader ``() -> (model, processor)``; None: no CLIP
    score. ``pipe``: an already loaded pipeline of ``settings.pipeline`` (default: loaded here)."""
    from tqdm.auto import tqdm

    from ..models.diffusers import RealGuidance, family_of_pipeline
    from ..models.diffusers.export import read_calibration
    from ..sampling import LORA_WEIGHTS, load_pipeline
    from ..training.validation import ValidationGrid, save_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = pipe if pipe is not None else load_pipeline(settings.pipeline)
    pipe.set_progress_bar_config(disable=True)
    family = family_of_pipeline(pipe)
    if settings.height is None or settings.width is None:
        default_height, default_width = family.latents.default_size(pipe)
        settings.height, settings.width = settings.height or default_height, settings.width or default_width
    latent_shape = family.latents.latent_shape(pipe, settings.height, settings.width)
    noise = torch.randn((len(settings.prompts), *latent_shape), generator=torch.Generator().manual_seed(settings.seed))
    write_text_atomic(out_dir / "eval_settings.json", json.dumps(asdict(settings), indent=2, default=str) + "\n",
                      what="evaluation settings")
    shift = family.sampling_shift if settings.shift is None else settings.shift
    real_cfg = isinstance(family.guidance, RealGuidance)

    def passes_of(guidance: float | None) -> int:
        return 2 if real_cfg and (guidance is None or guidance != 0) else 1

    passes = {"teacher": passes_of(settings.guidance),
              "student": passes_of(settings.guidance if settings.student_guidance is None else settings.student_guidance)}
    plan = [("teacher", settings.teacher_steps)] + [("student", n) for n in settings.steps]
    bar = tqdm(total=len(plan), desc="eval", disable=not progress)
    images: dict[tuple[str, int], torch.Tensor] = {}
    seconds: dict[tuple[str, int], float] = {}
    images[plan[0]], seconds[plan[0]] = _sample(pipe, settings, noise, settings.teacher_steps, settings.guidance)
    student_guidance = settings.guidance if settings.student_guidance is None else settings.student_guidance
    bar.update(1)
    calibration = read_calibration(settings.lora_dir) if settings.lora_scale is None else None
    scales = {n: (settings.lora_scale if settings.lora_scale is not None else
                  calibration.scale_for(n) if calibration is not None else 1.0) for n in settings.steps}
    pipe.load_lora_weights(settings.lora_dir, weight_name=LORA_WEIGHTS, adapter_name="scfm")
    for key in plan[1:]:
        pipe.fuse_lora(lora_scale=scales[key[1]], adapter_names=["scfm"])  # N student steps cost N base passes
        images[key], seconds[key] = _sample(pipe, settings, noise, key[1], student_guidance)
        pipe.unfuse_lora()
        bar.update(1)
    pipe.unload_lora_weights()
    bar.close()

    reference = None
    if settings.reference_dir:
        reference = load_reference_images(Path(settings.reference_dir), settings.height, settings.width)
    clip_metric = None
    if clip is not None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        clip_metric = CLIPScore(model_name_or_path=clip_loader(clip) if isinstance(clip, str) else clip)
    teacher_images = images[plan[0]]
    rows: list[MetricRow] = []
    for (model, steps), batch in images.items():
        def row(metric: str, value: float) -> MetricRow:
            return MetricRow(model, "euler", steps, steps * passes[model], shift, metric, value)

        if fid_features is not None and (model, steps) != plan[0]:
            rows.append(row("fid_teacher", frechet_distance(batch, teacher_images, fid_features, inception_weights)))
        if fid_features is not None and reference is not None:
            rows.append(row("fid_reference", frechet_distance(batch, reference, fid_features, inception_weights)))
        if clip_metric is not None:
            clip_metric.reset()
            clip_metric.update((batch * 255).round().to(torch.uint8), list(settings.prompts))
            rows.append(row("clip_score", float(clip_metric.compute())))
        rows.append(row("seconds_per_image", seconds[(model, steps)]))

    write_metrics(rows, out_dir / "metrics.json", {"num_prompts": len(settings.prompts), "family": family.name,
                                                   "shift": shift, "lora_scales": {str(n): a for n, a in scales.items()},
                                                   "calibrated": calibration is not None})
    figures = plot_metric_vs_steps(rows, out_dir)
    shown = min(8, len(settings.prompts))
    columns = [images[("student", n)][:shown] for n in settings.steps] + [teacher_images[:shown]]
    labels = [f"student {n}" for n in settings.steps] + [f"teacher {settings.teacher_steps}"]
    figures.append(save_grid(ValidationGrid(torch.stack(columns, dim=1), settings.prompts[:shown], labels),
                             out_dir / "samples.png"))
    metrics = list(dict.fromkeys(r.metric for r in rows))
    table = markdown_table(rows, metrics)
    lines = [f"# SCFM LoRA evaluation: {family.name}", "",
             f"Pipeline `{settings.pipeline}`, LoRA `{settings.lora_dir}` at scale "
             + ", ".join(f"{a:g} ({n} steps)" for n, a in scales.items())
             + (" (its step calibration)" if calibration is not None else "") + "; "
             f"{len(settings.prompts)} prompts at {settings.height}x{settings.width}, the same noise for every row; "
             f"grid shift {shift}; nfe counts both CFG passes.", "",
             "fid_teacher: FID against the teacher's "
             f"{settings.teacher_steps}-step images of the same prompts and noise; fid_reference: against the "
             "reference folder; clip_score: torchmetrics CLIP score; seconds_per_image: pipeline wall time.", "",
             table, ""] + [f"![{p.stem}]({p.name})" for p in figures]
    write_text_atomic(out_dir / "report.md", "\n".join(lines) + "\n", what="report")
    return LoraEvalReport(rows, out_dir, table, images)
