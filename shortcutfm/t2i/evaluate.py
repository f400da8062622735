"""Step sweeps of a world pipeline's teacher and SCFM students, scored by the judge (:mod:`.judge`).

Everything samples with the library's own Euler/Heun samplers on the family's velocity adapter, guided with
classifier-free guidance exactly as training did (the tests show these equal the stock pipeline with the
exported LoRA). A LoRA is fused into its own copy of the transformer at its scale, so an N-step student costs N
guided passes. Rows follow ``metrics.json``: ``model``, ``sampler``, ``steps``, ``nfe`` (transformer passes per
image, both CFG passes counted), ``shift``, ``metric`` (``fd_data``, ``fd_teacher``, ``adherence``), ``value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.calibration import for_steps
from ..core.samplers import sample
from ..evaluation.sweep import MetricRow
from . import judge as judging
from . import world
from .pipeline import MARKER, T5_LENGTH, decode

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "t2i"
BUNDLED_PIPELINE = ASSETS / "pipeline"
BUNDLED_JUDGE = ASSETS / "judge"


def is_world_pipeline(path: str | Path) -> bool:
    """Whether ``path`` is a pipeline folder of the t2i world (it holds the marker :func:`save_pipeline` writes)."""
    return (Path(path) / MARKER).is_file()


def world_judge(cache_dir: Path, progress: bool = True):
    """The judge: the bundled weights when they match today's recipe, else cached or trained in ``cache_dir``."""
    key_file = BUNDLED_JUDGE / f"t2i-judge-{judging._key(judging.JudgeConfig())}.safetensors"
    if key_file.is_file():
        return judging.load_or_train_judge(BUNDLED_JUDGE, progress=progress)
    return judging.load_or_train_judge(cache_dir, progress=progress)


def load_world_pipeline(path: str | Path):
    from diffusers import StableDiffusion3Pipeline

    from ..sampling import absent_components

    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), torch_dtype=torch.float32, **absent_components(str(path)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fused_lora_transformer(pipeline_dir: str | Path, lora_dir: str | Path, lora_scale: float = 1.0,
                           weight_name: str = "pytorch_lora_weights.safetensors"):
    """The pipeline's transformer with the LoRA file fused in at ``lora_scale`` (no adapter left)."""
    from ..models.diffusers import fuse_lora

    pipe = load_world_pipeline(pipeline_dir)
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name, adapter_name="scfm")
    return fuse_lora(pipe, "scfm", lora_scale).transformer.eval().requires_grad_(False)


def lora_velocity(pipeline_dir: str | Path, lora_dir: str | Path, uncond, guidance_scale: float,
                  lora_scale: float | None = None):
    """A LoRA student's guided velocity as ``shortcutfm sample`` samples it: each step count at its calibrated scale
    (the LoRA's calibration.json), or every count at ``lora_scale`` (1 for a LoRA without calibration).
    Returns ``(velocity, calibration or None)``; one fused copy of the transformer is made per distinct scale."""
    from ..core.calibration import CalibratedVelocity
    from ..models.diffusers.export import read_calibration

    calibration = read_calibration(lora_dir) if lora_scale is None else None
    fused: dict[float, object] = {}

    def at(scale: float):
        if scale not in fused:
            fused[scale] = guided_velocity(fused_lora_transformer(pipeline_dir, lora_dir, scale), uncond,
                                           guidance_scale)
        return fused[scale]

    if calibration is not None:
        return CalibratedVelocity(at, calibration), calibration
    return at(1.0 if lora_scale is None else lora_scale), None


@dataclass
class PromptSet:
    """Prompts with their scenes, text tensors, the empty prompt's, and one noise tensor per prompt."""

    prompts: list[str]
    scenes: list[world.Scene]
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    noise: torch.Tensor
    reference: torch.Tensor = field(repr=False)  # real renders of the same scenes, (N, 3, 32, 32) in [-1, 1]
    floor_reference: torch.Tensor = field(repr=False)  # a second, independent set of renders


@torch.no_grad()
def prompt_set(pipe, prompts: list[str], seed: int, max_sequence_length: int = T5_LENGTH) -> PromptSet:
    from ..models.diffusers import family_of_pipeline

    family = family_of_pipeline(pipe)
    encoding = family.encode_prompts(pipe, list(prompts), max_sequence_length)
    latent = pipe.transformer.config.sample_size
    channels = pipe.transformer.config.in_channels
    noise = torch.randn(len(prompts), channels, latent, latent, generator=torch.Generator().manual_seed(seed))
    scenes = [world.parse_caption(p) for p in prompts]
    return PromptSet(
        list(prompts), scenes, dict(encoding.cond), dict(encoding.uncond), noise,
        judging.to_model_space(world.render_many(scenes, seed + 1)),
        judging.to_model_space(world.render_many(scenes, seed + 2)),
    )


def training_guidance_scale(config) -> float:
    """The CFG scale a world LoRA run trained with (``model.guidance_scale``, None = the SD3 family's)."""
    from ..models.diffusers import SD3

    return SD3.guidance.scale if config.model.guidance_scale is None else float(config.model.guidance_scale)


def guided_velocity(transformer, uncond, guidance_scale: float):
    from ..models.diffusers import SD3

    return SD3.guidance.wrap(uncond, guidance_scale)(SD3.velocity(transformer))


@torch.no_grad()
def sample_latents(velocity, prompts: PromptSet, steps: int, shift: float, method: str = "euler",
                   chunk: int = 256) -> tuple[torch.Tensor, int]:
    """Latents of every prompt (same noise), and the velocity evaluations per image."""
    from ..core.grids import sigma_grid

    grid = sigma_grid(steps, shift)
    outputs, nfe = [], 0
    for start in range(0, len(prompts.prompts), chunk):
        rows = slice(start, start + chunk)
        cond = {k: v[rows] for k, v in prompts.cond.items()}
        result = sample(velocity, prompts.noise[rows], grid, method, **cond)
        outputs.append(result.x)
        nfe = result.nfe
    return torch.cat(outputs), nfe


@dataclass
class SweepResult:
    rows: list[MetricRow]
    images: dict[tuple[str, str, int], torch.Tensor]  # (model, sampler, steps) -> decoded images
    accuracy: dict[str, float]  # the judge's held-out accuracy per attribute


def world_sweep(pipe, velocities: dict[str, tuple[object, tuple[tuple[str, int], ...]]], prompts: PromptSet,
                judge_model, *, shift: float, passes_per_evaluation: int | dict[str, int],
                teacher_reference_steps: int = 32, progress: bool = True) -> tuple[list[MetricRow], dict]:
    """Score every (model, sampler, steps) of ``velocities`` (name -> (velocity, ((sampler, steps), ...))).

    ``fd_teacher`` compares with the ``teacher``'s ``teacher_reference_steps``-step Euler samples of the same
    prompts and noise (sampled first; its rows are kept only if the plan lists it). Without a ``teacher`` in
    ``velocities`` there is no ``fd_teacher``. ``passes_per_evaluation``: transformer passes per velocity call
    (2 with CFG), one number or one per model name."""
    planned = [(name, sampler, steps) for name, (_, plan) in velocities.items() for sampler, steps in plan]
    reference_job = ("teacher", "euler", teacher_reference_steps) if "teacher" in velocities else None
    jobs = ([reference_job] if reference_job else []) + [job for job in planned if job != reference_job]
    images: dict[tuple[str, str, int], torch.Tensor] = {}
    rows: list[MetricRow] = []
    for name, sampler, steps in tqdm(jobs, desc="t2i step sweep", disable=not progress, dynamic_ncols=True):
        # a calibrated student: the model of this step count's scale
        latents, evaluations = sample_latents(for_steps(velocities[name][0], steps), prompts, steps, shift, sampler)
        decoded = decode(pipe.vae, latents)
        images[(name, sampler, steps)] = decoded
        if (name, sampler, steps) not in planned:
            continue
        values = {"fd_data": judging.fd(judge_model, decoded, prompts.reference)}
        if reference_job and (name, sampler, steps) != reference_job:  # the reference against itself is 0
            values["fd_teacher"] = judging.fd(judge_model, decoded, images[reference_job])
        values["adherence"] = judging.adherence(judge_model, decoded, prompts.scenes)
        passes = passes_per_evaluation if isinstance(passes_per_evaluation, int) else passes_per_evaluation[name]
        nfe = evaluations * passes
        rows += [MetricRow(name, sampler, steps, nfe, shift, metric, value) for metric, value in values.items()]
    return rows, images


def floor_rows(judge_model, prompts: PromptSet) -> list[MetricRow]:
    """The data-against-data floor of ``fd_data`` and the adherence of real renders (model "data")."""
    return [
        MetricRow("data", "-", 0, 0, 0.0, "fd_data", judging.fd(judge_model, prompts.floor_reference, prompts.reference)),
        MetricRow("data", "-", 0, 0, 0.0, "adherence", judging.adherence(judge_model, prompts.reference, prompts.scenes)),
    ]


def held_out_prompts(count: int, seed: int) -> list[str]:
    """The evaluation prompts: captions of held-out scenes (never drawn for training)."""
    return world.captions_for(world.random_scenes(count, seed, split="heldout"), seed + 1)


def training_prompts(count: int, seed: int) -> list[str]:
    return world.captions_for(world.random_scenes(count, seed, split="train"), seed + 1)


def selection_evaluator(config, student, cache, cache_dir: Path):
    """Checkpoint selection for a LoRA run on a world pipeline: ``fd_teacher`` of ``eval.select_steps``-step
    samples against the teacher's 32-step samples (same noise), on ``eval.num_samples`` rows that cycle through
    the cache's *training* prompts (so a 1-image few-shot cache still gives a distribution); the held-out prompts
    stay unseen until the final sweep. Teacher samples are drawn once, when the evaluator is made."""
    from diffusers import AutoencoderKL

    from ..core.grids import sigma_grid
    from ..training.setup import Evaluation

    judge_model, _ = world_judge(cache_dir, progress=False)
    vae = AutoencoderKL.from_pretrained(config.model.pretrained, subfolder="vae").eval().requires_grad_(False)
    count = max(2, config.eval.num_samples)
    record = cache.get(torch.arange(count) % len(cache))
    latents_shape = record.pop("latents").shape
    cond = student.family.sampling_cond(record)
    noise = torch.randn(latents_shape, generator=torch.Generator().manual_seed(config.eval.seed))
    shift = config.eval.select_shift

    def images_of(velocity, steps: int) -> torch.Tensor:
        grid = sigma_grid(steps, shift)
        latents = torch.cat([sample(velocity, noise[i:i + 256], grid, "euler",
                                    **{k: v[i:i + 256] for k, v in cond.items()}).x for i in range(0, count, 256)])
        return decode(vae, latents)

    teacher_images = images_of(student.target_velocities().teacher, 32)

    def evaluate(velocity):
        value = judging.fd(judge_model, images_of(velocity, config.eval.select_steps), teacher_images)
        return Evaluation(f"fd_teacher@{config.eval.select_steps} (training prompts)", value)

    return evaluate
