"""End-to-end distillation of (tiny) diffusers models: saved pipeline -> prepared cache -> run_training with the
family preset -> exported LoRA in the stock pipeline == the library's own sampler on the trained student.

Also the few-shot path through the CLI (prepare -> train -> sample) and its bad-input error.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffusers_fixtures import SEQUENCE_LENGTH, tiny_latents, tiny_pipeline
from shortcutfm.cli import app
from shortcutfm.config import load_config
from shortcutfm.core import euler_sample
from shortcutfm.core.guidance import ClassifierFreeGuidance
from shortcutfm.models.diffusers import (
    EMA_WEIGHTS, STUDENT_WEIGHTS, LoraSettings, LoraStudent, sample_with_pipeline, sampling_grid,
)
from shortcutfm.preparation import LatentCache, prepare_from_folder
import shortcutfm.models.diffusers as diffusers_models
from shortcutfm.sampling import load_pipeline, sample_diffusers
from shortcutfm.training.checkpoint import step_name
from shortcutfm.workflows import resolve_config_path, run_training

torch.set_num_threads(1)
diffusers_logging.set_verbosity_error()
SIZE = 16  # pixels: a multiple of every tiny pipeline's pixel multiple; latents are 8x8
PROMPTS = ["a photo of a cat", "red tree in the sky"]
STEPS = 3


def make_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 256, size=(SIZE, SIZE, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:02d}.png")
        (folder / f"img{index:02d}.txt").write_text(f"a photo of {['cat', 'dog'][index % 2]} in the sky")
    return folder


def save_tiny_pipeline(family: str, directory: Path) -> Path:
    tiny_pipeline(family).save_pretrained(directory)
    return directory


def tiny_overrides(family: str, pipe_dir: Path, cache_dir: Path, run_dir: Path, extra=()) -> list[str]:
    """Tiny sizes on top of the family preset (which stays in charge of guidance, shifts, EMA, clipping)."""
    return [
        f"data.source={cache_dir}", f"model.pretrained={pipe_dir}", "model.dtype=float32",
        # quoted: YAML 1.1 reads a bare `no` as false (see the report of this test file)
        'train.mixed_precision="no"', "lora.rank=4", "lora.alpha=4", f"train.steps={STEPS}", "train.batch_size=2",
        "jumps.teacher_grid=4", "jumps.self_grids=[2,4]", "eval.every=2", "eval.num_samples=2",
        "optim.lr=1e-2",  # large enough that 3 steps move the LoRA far from zero (a non-vacuous comparison)
        "train.checkpoint_every=1", f"train.keep_checkpoints={STEPS}", f"train.output_dir={run_dir}", *extra,
    ]


def fresh_student(family, pipe_dir: Path, cache: LatentCache, config, checkpoint: Path) -> LoraStudent:
    """A new LoraStudent on the saved pipeline's transformer, with the checkpoint's student and EMA weights."""
    student = LoraStudent.from_pretrained(
        family, str(pipe_dir), lora=LoraSettings(rank=config.lora.rank, alpha=config.lora.alpha),
        schedule=config.ema, dtype=torch.float32, uncond=cache.uncond, guidance_scale=config.model.guidance_scale,
        gradient_checkpointing=False,
    )
    student.load_state_dict(load_file(str(checkpoint / "student.safetensors")))
    student.emas.load_state_dict(load_file(str(checkpoint / "ema.safetensors")))
    return student


def library_latents(student: LoraStudent, pipe, velocity, noise: torch.Tensor, guidance) -> torch.Tensor:
    family = student.family
    encoding = family.encode_prompts(pipe, PROMPTS, max_sequence_length=SEQUENCE_LENGTH[family.name])
    grid = sampling_grid(family, STEPS, *noise.shape[-2:])
    cond = family.sampling_cond(encoding.cond, guidance if family.name == "flux" else None)
    return euler_sample(velocity, noise, grid, **cond).x


def pipeline_latents(family: str, pipe, lora_dir: Path, noise: torch.Tensor, guidance) -> torch.Tensor:
    """The stock pipeline's own ``load_lora_weights`` on the exported file, then pipeline sampling."""
    pipe.load_lora_weights(str(lora_dir), weight_name=STUDENT_WEIGHTS, adapter_name="scfm")
    return sample_with_pipeline(pipe, PROMPTS, num_steps=STEPS, latents=noise, guidance=guidance,
                                max_sequence_length=SEQUENCE_LENGTH[family])


class GuidanceSpy:
    """Records, for every ClassifierFreeGuidance call, whether it wrapped the trained (grad-carrying) pass."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, bool]] = []
        original = ClassifierFreeGuidance.forward
        spy = self

        def forward(self, x, sigma, **cond):
            spy.calls.append((type(self.model).__name__, torch.is_grad_enabled()))
            return original(self, x, sigma, **cond)

        monkeypatch.setattr(ClassifierFreeGuidance, "forward", forward)


@pytest.mark.parametrize(
    "family, checkpointing, extra",
    [("flux", False, []), ("sd3", True, ["model.guidance_scale=2.0"]), ("lumina2", True, []),
     ("flux2", False, []), ("qwen_image", False, []), ("wan", True, [])],
)
def test_family_preset_distils_and_pipeline_matches_library(family, checkpointing, extra, tmp_path, monkeypatch):
    pipe_dir = save_tiny_pipeline(family, tmp_path / "pipe")
    prepare_pipe = load_pipeline(str(pipe_dir))  # the library's own offline loader (DiffusionPipeline)
    prepare_pipe.set_progress_bar_config(disable=True)
    report = prepare_from_folder(prepare_pipe, make_images(tmp_path / "images", 4), tmp_path / "cache",
                                 height=SIZE, width=SIZE, max_sequence_length=SEQUENCE_LENGTH[family],
                                 show_progress=False)
    assert report.num_records == 4 and not report.failed
    config = load_config(resolve_config_path(family), tiny_overrides(
        family, pipe_dir, tmp_path / "cache", tmp_path / "run",
        [f"model.gradient_checkpointing={str(checkpointing).lower()}", *extra]))
    assert config.model.kind == family and config.model.gradient_checkpointing is checkpointing

    spy = GuidanceSpy(monkeypatch)
    result = run_training(config, progress=False)
    monkeypatch.undo()
    assert result.state.step == STEPS
    assert [h.step for h in result.state.history] == [2, 3]

    # guidance: the CFG families train the student *and* its targets on guided velocities; Flux embeds it
    trained_passes = [kind for kind, grad in spy.calls if grad and kind != "_AdapterVelocity"]
    target_passes = [kind for kind, _ in spy.calls if kind == "_AdapterVelocity"]
    if family == "flux":
        assert spy.calls == []
    else:
        assert len(trained_passes) == STEPS, spy.calls  # one guided student forward per step
        assert target_passes, "targets (teacher / EMA) were not guided"

    # the LoRA moved away from zero, and final/ is the last checkpoint's student exactly
    last = result.run_dir / "checkpoints" / step_name(STEPS)
    trained = load_file(str(last / "student.safetensors"))
    # The last joint block's text-stream outputs are discarded (SD3, Qwen-Image): their LoRA gets no gradient.
    last_block = max((int(k.split(".")[1]) for k in trained if k.startswith("transformer_blocks.")), default=-1)
    discarded = ("add_q_proj", "to_add_out", "txt_mlp", "ff_context")
    b_tensors = [v for k, v in trained.items() if "lora_B" in k and not (
        k.startswith(f"transformer_blocks.{last_block}.") and any(name in k for name in discarded))]
    moved = [bool(v.abs().max() > 0) for v in b_tensors]
    assert b_tensors and sum(moved) >= 0.9 * len(moved), f"{sum(moved)} of {len(moved)} LoRA B tensors moved"
    exported = load_file(str(result.run_dir / "final" / STUDENT_WEIGHTS))
    assert set(exported) == {f"transformer.{k}" for k in trained}
    assert all(torch.equal(exported[f"transformer.{k}"], v) for k, v in trained.items())

    # model/ is the best evaluated step's student (a copy of best/)
    best_ckpt = result.run_dir / "checkpoints" / step_name(result.state.best_step)
    best_weights = load_file(str(best_ckpt / "student.safetensors"))
    model_weights = load_file(str(result.model_dir / STUDENT_WEIGHTS))
    assert all(torch.equal(model_weights[f"transformer.{k}"], v) for k, v in best_weights.items())
    assert (result.model_dir / EMA_WEIGHTS).is_file()

    # the stock pipeline with the exported LoRA == euler_sample on a fresh LoraStudent with the trained weights
    cache = LatentCache(tmp_path / "cache")
    student = fresh_student(family, pipe_dir, cache, config, last)
    pipe = load_pipeline(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    noise = tiny_latents(family, batch=2, seed=7)
    guidance = config.model.guidance_scale
    out = pipeline_latents(family, pipe, result.run_dir / "final", noise, guidance)
    expected = library_latents(student, pipe, student.velocity(), noise, guidance)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    teacher = library_latents(student, pipe, student.target_velocities().teacher, noise, guidance)
    assert (out - teacher).abs().max() > 1e-3, "the trained LoRA does not change the samples: vacuous comparison"

    # `shortcutfm sample` samples as the run trained: its guidance scale, resolution and text length
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    original = diffusers_models.sample_with_pipeline
    monkeypatch.setattr(diffusers_models, "sample_with_pipeline", recording)
    written = sample_diffusers(result.model_dir, pretrained=None, prompts=PROMPTS[:1], steps=2, shift=None,
                               lora_scale=1.0, seed=0, out=tmp_path / "sample.png")
    assert written == [tmp_path / "sample.png"] and written[0].is_file()
    (call,) = calls
    assert call["guidance"] == config.model.guidance_scale and (family != "sd3" or call["guidance"] == 2.0)
    assert (call["height"], call["width"], call["max_sequence_length"]) == (SIZE, SIZE, SEQUENCE_LENGTH[family])


# ---------------------------------------------------------------- the few-shot path through the CLI


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def flux_pipe_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("flux") / "pipe")


def test_cli_few_shot_prepare_train_sample(flux_pipe_dir, tmp_path):
    images = make_images(tmp_path / "images", 10)
    cache, run = tmp_path / "cache", tmp_path / "run"
    prepared = invoke(["prepare", "--pipeline", str(flux_pipe_dir), "--images", str(images), "--out", str(cache),
                       "--height", str(SIZE), "--width", str(SIZE)])
    assert prepared.exit_code == 0, prepared.output
    assert len(LatentCache(cache)) == 10

    overrides = tiny_overrides("flux", flux_pipe_dir, cache, run)
    trained = invoke(["train", "flux", *overrides])
    assert trained.exit_code == 0, trained.output
    assert (run / "model" / STUDENT_WEIGHTS).is_file() and (run / "model" / EMA_WEIGHTS).is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["pretrained"] == str(flux_pipe_dir)
    # the model card, in the Hub's format: metadata a Hub page reads, and how to sample the LoRA
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "model" / "README.md")
    assert card.data.base_model == str(flux_pipe_dir) and card.data.library_name == "diffusers"
    assert "lora" in card.data.tags and "scfm" in card.data.tags
    assert f"--steps {saved['eval']['select_steps']}" in card.text and "FluxPipeline.from_pretrained" in card.text
    assert "| step | metric | value |" in card.text

    out = tmp_path / "img.png"
    sampled = invoke(["sample", str(run), "--prompt", "a cat", "--steps", "3", "--out", str(out)])
    assert sampled.exit_code == 0, sampled.output
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)  # the training resolution


def test_cli_prepare_corrupt_image_fails_with_its_name(flux_pipe_dir, tmp_path):
    images = make_images(tmp_path / "images", 3)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (images / "broken.txt").write_text("a photo of a dog")
    result = invoke(["prepare", "--pipeline", str(flux_pipe_dir), "--images", str(images),
                     "--out", str(tmp_path / "cache"), "--height", str(SIZE), "--width", str(SIZE)])
    assert result.exit_code == 2, result.output
    assert "broken.png" in result.output


def test_cli_train_on_a_missing_cache_is_a_clean_error(flux_pipe_dir, tmp_path):
    missing = tmp_path / "no-cache"
    result = invoke(["train", "flux", f"data.source={missing}", f"model.pretrained={flux_pipe_dir}",
                     f"train.output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2, result.output
    assert "no-cache" in result.output and "shortcutfm prepare" in result.output
