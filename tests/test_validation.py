"""Validation during a LoRA run: grids of validation prompts under RUN/validation/ and in the tracker, and the
checkpoint-selection metric computed from the validation prompts' samples (teacher-relative latent distance)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_fixtures import SEQUENCE_LENGTH, tiny_pipeline
from shortcutfm.config import ConfigError, load_config
from shortcutfm.models.diffusers import LoraStudent
from shortcutfm.preparation import LatentCache, prepare_from_folder
from shortcutfm.sampling import load_pipeline
from shortcutfm.training.checkpoint import step_name
from shortcutfm.training.validation import ValidationGrid, log_grid, lora_validation
from shortcutfm.workflows import resolve_config_path, run_training

torch.set_num_threads(1)
PROMPTS = ["a photo of a cat", "red tree in the sky", "a dog"]


def prepared(tmp_path, family="sd3"):
    pipe_dir = tmp_path / "pipe"
    tiny_pipeline(family).save_pretrained(pipe_dir)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of {['cat', 'dog'][i % 2]}")
    pipe = load_pipeline(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    prepare_from_folder(pipe, images, tmp_path / "cache", height=16, width=16,
                        max_sequence_length=SEQUENCE_LENGTH[family], show_progress=False)
    return pipe_dir


def overrides(tmp_path, pipe_dir, *extra):
    return [f"data.source={tmp_path / 'cache'}", f"model.pretrained={pipe_dir}", "model.dtype=float32",
            'train.mixed_precision="no"', "lora.rank=4", "lora.alpha=4", "train.steps=3", "train.batch_size=2",
            "jumps.teacher_grid=4", "jumps.self_grids=[2,4]", "eval.every=2", "optim.lr=1e-2",
            "train.checkpoint_every=1", "train.keep_checkpoints=3", f"train.output_dir={tmp_path / 'run'}", *extra]


def test_validation_grids_and_selection_on_validation_prompts(tmp_path):
    pipe_dir = prepared(tmp_path)
    config = load_config(resolve_config_path("sd3"), overrides(
        tmp_path, pipe_dir, f"validation.prompts={PROMPTS}", "validation.steps=[1,2]"))
    result = run_training(config, progress=False)
    grids = sorted(p.name for p in (result.run_dir / "validation").glob("*.png"))
    assert grids == ["step-000002.png", "step-000003.png"]  # eval.every=2, and the end of training
    with Image.open(result.run_dir / "validation" / grids[0]) as image:
        assert image.size[0] > 200 and image.size[1] > 200
    history = result.state.history
    assert [h.metric for h in history] == ["latent_mse_to_teacher32@3"] * 2

    # the recorded metric is the validation prompts' distance: recompute it for step 2's weights
    cache = LatentCache(tmp_path / "cache")
    student = LoraStudent.from_pretrained("sd3", str(pipe_dir), lora=config.lora, schedule=config.ema,
                                          dtype=torch.float32, uncond=cache.uncond,
                                          guidance_scale=config.model.guidance_scale, gradient_checkpointing=False)
    student.load_state_dict(load_file(str(result.run_dir / "checkpoints" / step_name(2) / "student.safetensors")))
    validation = lora_validation(config, student, cache)
    assert validation.prompts == PROMPTS and len(validation.noise) == len(PROMPTS)
    assert validation.evaluate(student.velocity()).value == pytest.approx(history[0].value, rel=1e-4, abs=1e-9)
    grid = validation.grid(student.velocity())
    assert grid.images.shape[:3] == (3, 3, 3) and grid.labels[-1] == "teacher 32 steps"
    assert (grid.images[:, 0] - grid.images[:, -1]).abs().max() > 1e-3  # 1 student step differs from the teacher


@pytest.mark.parametrize("family", ["flux2", "qwen_image", "wan"])
def test_validation_grids_of_the_newer_families(family, tmp_path):
    """Validation prompts encode and their latents decode through each family's own codec (FLUX.2's patchified
    latents, Qwen-Image's and Wan's 3-D VAEs; Wan decodes the first frame of its one-frame videos)."""
    pipe_dir = prepared(tmp_path, family)
    config = load_config(resolve_config_path(family), overrides(
        tmp_path, pipe_dir, f"validation.prompts={PROMPTS[:2]}", "validation.steps=[1,2]", "train.steps=2",
        "train.keep_checkpoints=2"))
    result = run_training(config, progress=False)
    assert sorted(p.name for p in (result.run_dir / "validation").glob("*.png")) == ["step-000002.png"]
    cache = LatentCache(tmp_path / "cache")
    student = LoraStudent.from_pretrained(family, str(pipe_dir), lora=config.lora, schedule=config.ema,
                                          dtype=torch.float32, uncond=cache.uncond,
                                          guidance_scale=config.model.guidance_scale, gradient_checkpointing=False)
    grid = lora_validation(config, student, cache).grid(student.velocity())
    assert grid.images.shape[:3] == (2, 3, 3) and grid.images.shape[-2:] == (16, 16)
    assert torch.isfinite(grid.images.float()).all() and grid.images.float().std() > 0


def test_without_validation_prompts_the_cached_prompts_select_and_no_grid_is_drawn(tmp_path):
    pipe_dir = prepared(tmp_path)
    config = load_config(resolve_config_path("sd3"), overrides(tmp_path, pipe_dir, "eval.num_samples=3"))
    result = run_training(config, progress=False)
    assert not (result.run_dir / "validation").exists()
    assert result.state.history[0].metric == "latent_mse_to_teacher32@3"


def test_grids_go_to_the_tracker():
    images = torch.rand(2, 3, 3, 4, 5)
    grid = ValidationGrid(images, ["a", "b"], ["s1", "s2", "teacher"])
    tiled = grid.tiled()
    assert tiled.shape == (8, 15, 3) and tiled.dtype == torch.uint8
    assert torch.equal(tiled[4:8, 5:10], (images[1, 1].permute(1, 2, 0) * 255).round().to(torch.uint8))
    logged = []
    tracker = SimpleNamespace(name="tensorboard", log_images=lambda values, step, **kw: logged.append((values, step, kw)))
    log_grid(SimpleNamespace(trackers=[tracker]), grid, step=7)
    (values, step, kw), = logged
    assert step == 7 and values["validation"].shape == (1, 8, 15, 3) and kw == {"dataformats": "NHWC"}


def test_validation_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["model.kind=sd3", "model.pretrained=p", "validation.prompts=[a]", "validation.prompt_file=x"])
    with pytest.raises(ConfigError, match="validation.steps"):
        load_config(None, ["model.kind=sd3", "model.pretrained=p", "validation.steps=[0]"])


def test_eval_of_a_run_adds_its_table_to_the_model_card(tmp_path):
    from huggingface_hub import ModelCard
    from typer.testing import CliRunner

    from shortcutfm.cli import app

    pipe_dir = prepared(tmp_path)
    config = load_config(resolve_config_path("sd3"), overrides(tmp_path, pipe_dir, "eval.every=0"))
    result = run_training(config, progress=False)
    card = ModelCard.load(result.model_dir / "README.md")
    assert card.data.base_model == str(pipe_dir) and "## Evaluation" not in card.text
    assert "Grid shift:** 3" in card.text and "w = 3.5" in card.text  # the sd3 family's defaults, resolved
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = CliRunner().invoke(app, ["eval", str(result.run_dir), "--prompts", str(prompts), "--steps", "1,2", "--no-fid",
                                   "--out", str(tmp_path / "eval")])
    assert out.exit_code == 0, out.output
    card = ModelCard.load(result.model_dir / "README.md")
    assert "## Evaluation" in card.text and "seconds per image" in card.text


def test_validation_prompts_encode_with_an_sd3_pipeline_without_t5(tmp_path):
    """SD3 without its T5 encoder (the proving ground's pipeline) reads the transformer's config to make the zero T5
    embeddings, so the prompt encoder keeps the transformer there."""
    from shortcutfm.models.diffusers import get_family
    from shortcutfm.training.validation import load_prompt_encoder

    pipe = tiny_pipeline("sd3")
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(tmp_path / "pipe")
    config = load_config(None, ["model.kind=sd3", f"model.pretrained={tmp_path / 'pipe'}", "validation.prompts=[a dog]"])
    encoder = load_prompt_encoder(config, get_family("sd3"))
    encoding = get_family("sd3").encode_prompts(encoder, ["a dog"], SEQUENCE_LENGTH["sd3"])
    assert encoding.cond["prompt_embeds"].shape[0] == 1


def test_a_tiny_cache_is_read_with_several_noise_draws_per_record(tmp_path):
    """Without validation prompts a 4-record cache gives MIN_CACHED_ROWS rows (records repeat, each with its own
    noise), so the calibration's one-standard-error rule has samples; a budget below that is kept."""
    from shortcutfm.training.validation import MIN_CACHED_ROWS

    pipe_dir = prepared(tmp_path)
    cache = LatentCache(tmp_path / "cache")
    config = load_config(resolve_config_path("sd3"), overrides(tmp_path, pipe_dir))
    student = LoraStudent.from_pretrained("sd3", str(pipe_dir), lora=config.lora, schedule=config.ema,
                                          dtype=torch.float32, uncond=cache.uncond,
                                          guidance_scale=config.model.guidance_scale, gradient_checkpointing=False)
    validation = lora_validation(config, student, cache)
    assert len(cache) == 4 and len(validation.noise) == len(validation.prompts) == MIN_CACHED_ROWS
    assert validation.prompts == [r.caption for r in cache.records] * (MIN_CACHED_ROWS // 4)
    assert not torch.allclose(validation.noise[0], validation.noise[4])  # a repeated record, new noise
    first, again = validation.cond["prompt_embeds"][0], validation.cond["prompt_embeds"][4]
    assert torch.equal(first, again)
    small = load_config(resolve_config_path("sd3"), overrides(tmp_path, pipe_dir, "eval.num_samples=2"))
    assert len(lora_validation(small, student, cache).noise) == 2
