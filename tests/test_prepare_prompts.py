"""prepare_from_prompts: teacher-made data with tiny Flux / SD3 / Lumina 2 / FLUX.2 / Qwen-Image / Wan pipelines
built from config."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers_fixtures import LATENT_FRAMES, LATENT_SIZE, NUM_FRAMES, TEXT_LENGTH, quiet_tiny_pipelines

from shortcutfm.preparation import (
    LatentCache,
    PreparationReport,
    prepare_from_folder,
    prepare_from_prompts,
    prompt_seed,
)

FAMILIES = ["flux", "sd3", "lumina2", "flux2", "qwen_image", "wan"]
# Pixels giving the tiny transformers' 8x8 latents (Lumina2Pipeline assumes an 8x VAE whatever the VAE is).
TEACHER_SIZE = {"flux": 16, "sd3": 16, "lumina2": 64, "flux2": 32, "qwen_image": 16, "wan": 16}
CHANNELS = {"flux2": 16}  # FLUX.2: the 4-channel VAE latent patchified 2x2
#: what a user passes as pipeline_kwargs (the video length of Wan's teacher samples)
EXTRA = {"wan": {"num_frames": NUM_FRAMES}}
PROMPTS = ["a photo of a cat", "a red house", "a dog in the sky"]


@pytest.fixture(scope="module")
def pipes():
    return quiet_tiny_pipelines(FAMILIES)


def prepare(pipe, family, prompt_file, out_dir, **kwargs) -> PreparationReport:
    size = TEACHER_SIZE[family]
    kwargs = {"num_steps": 2, "height": size, "width": size, "max_sequence_length": TEXT_LENGTH,
              "model_id": "tiny", "show_progress": False, "batch_size": 2, **kwargs}
    return prepare_from_prompts(pipe, prompt_file, out_dir, **kwargs)


def pipeline_latents(pipe, family, prompt, seed):
    """The pipeline's own output for one prompt, in (C, H, W) layout ((C, F, H, W) for Wan), guided as its users
    guide it (Qwen-Image's true CFG needs a negative prompt)."""
    size = TEACHER_SIZE[family]
    guidance = {"true_cfg_scale": 4.0, "negative_prompt": ""} if family == "qwen_image" else {}
    output = pipe(prompt=prompt, height=size, width=size, num_inference_steps=2, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=TEXT_LENGTH,
                  return_dict=False, **guidance, **EXTRA.get(family, {}))[0]
    if family == "flux":  # packed (B, tokens, C*4); the pipeline's own unpacking is the oracle here
        output = pipe._unpack_latents(output, size, size, pipe.vae_scale_factor)
    if family == "qwen_image":  # packed too; its unpacking gives (B, C, 1, H, W)
        output = pipe._unpack_latents(output, size, size, pipe.vae_scale_factor)[:, :, 0]
    if family == "flux2":  # the raw VAE latent: the space it denoised in is its 2x2 patches, batch-normalised
        bn = pipe.vae.bn
        std = (bn.running_var + pipe.vae.config.batch_norm_eps).sqrt().view(1, -1, 1, 1)
        output = (pipe._patchify_latents(output) - bn.running_mean.view(1, -1, 1, 1)) / std
    return output[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_latents_equal_the_pipeline_output(pipes, family, tmp_path):
    pipe = pipes[family]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# teacher prompts\n" + "\n\n".join(PROMPTS) + "\n")
    extra = {"pipeline_kwargs": EXTRA[family]} if family in EXTRA else {}
    report = prepare(pipe, family, prompt_file, tmp_path / "cache", **extra)
    assert (report.added, report.already_cached, report.num_records) == (3, 0, 3)

    cache = LatentCache(tmp_path / "cache")
    assert sorted(record.caption for record in cache.records) == sorted(PROMPTS)
    batch = cache.get(torch.arange(3))
    frames = (LATENT_FRAMES,) if family == "wan" else ()
    assert batch["latents"].shape == (3, CHANNELS.get(family, 4), *frames, LATENT_SIZE, LATENT_SIZE)
    for row, record in enumerate(cache.records):
        assert record.seed == prompt_seed(0, record.caption) and record.source == "teacher"
        expected = pipeline_latents(pipe, family, record.caption, record.seed)
        torch.testing.assert_close(batch["latents"][row], expected, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "cache/uncond.safetensors").is_file()

    # Re-running, even with the prompts in another order, adds nothing.
    prompt_file.write_text("\n".join(reversed(PROMPTS)))
    again = prepare(pipe, family, prompt_file, tmp_path / "cache", **extra)
    assert (again.added, again.already_cached, again.num_records) == (0, 3, 3)


def test_samples_per_prompt_seeds_and_duplicates(pipes, tmp_path):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text('{"prompt": "a cat"}\n"a dog"\n"a cat"\n')
    report = prepare(pipes["sd3"], "sd3", prompt_file, tmp_path / "cache", samples_per_prompt=2, seed=7)
    assert (report.added, report.already_cached) == (4, 2)  # the repeated "a cat" is the same two records
    cache = LatentCache(tmp_path / "cache")
    expected_seeds = {prompt_seed(7, prompt, index) for prompt in ["a cat", "a dog"] for index in (0, 1)}
    assert {record.seed for record in cache.records} == expected_seeds
    latents = cache.get(torch.arange(4))["latents"]
    assert not torch.allclose(latents[0], latents[1])


def test_teacher_and_folder_records_share_a_cache(pipes, tmp_path):
    from PIL import Image

    pipe = pipes["flux"]
    (tmp_path / "prompts.txt").write_text("a cat\n")
    prepare(pipe, "flux", tmp_path / "prompts.txt", tmp_path / "cache")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "images/red.png")
    (tmp_path / "images/red.txt").write_text("a red image")
    prepare_from_folder(pipe, tmp_path / "images", tmp_path / "cache", height=16, width=16,
                        max_sequence_length=TEXT_LENGTH, model_id="tiny", show_progress=False)
    cache = LatentCache(tmp_path / "cache")
    assert sorted(record.source for record in cache.records) == ["red.png", "teacher"]
    assert len(cache.manifest["runs"]) == 2


def test_argument_errors(pipes, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match=r"pipeline_kwargs may not set \['generator'\]"):
        prepare(pipes["flux"], "flux", tmp_path / "prompts.txt", tmp_path / "cache", pipeline_kwargs={"generator": 1})
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        prepare(pipes["flux"], "flux", tmp_path / "prompts.txt", tmp_path / "cache", num_steps=0)
    with pytest.raises(ValueError, match="JSON-able"):
        prepare(pipes["flux"], "flux", tmp_path / "prompts.txt", tmp_path / "cache",
                pipeline_kwargs={"sigmas": torch.ones(2)})


def test_cli_prepares_teacher_videos_at_the_requested_frame_count(tmp_path):
    """`shortcutfm prepare --prompts P --num-frames N` on a (tiny) Wan pipeline: latents of N video frames;
    a frame count that is not 4k + 1 is a one-line error naming the flag."""
    from typer.testing import CliRunner

    from diffusers_fixtures import tiny_pipeline
    from shortcutfm.cli import app

    tiny_pipeline("wan").save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    args = ["prepare", "--pipeline", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"),
            "--out", str(tmp_path / "cache"), "--steps", "2", "--height", "16", "--width", "16",
            "--max-sequence-length", str(TEXT_LENGTH)]
    bad = CliRunner().invoke(app, [*args, "--num-frames", "4"])
    assert bad.exit_code != 0 and "--num-frames 4" in bad.output and "4k + 1" in bad.output
    result = CliRunner().invoke(app, [*args, "--num-frames", str(NUM_FRAMES)])
    assert result.exit_code == 0, result.output
    latents = LatentCache(tmp_path / "cache").get(torch.arange(2))["latents"]
    assert latents.shape == (2, 4, LATENT_FRAMES, LATENT_SIZE, LATENT_SIZE)
