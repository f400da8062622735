"""prepare_from_folder with tiny Flux / SD3 / Lumina 2 / FLUX.2 / Qwen-Image / Wan pipelines built from config
(offline)."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from diffusers_fixtures import TEXT_LENGTH, quiet_tiny_pipelines
from PIL import Image

from shortcutfm.preparation import (
    CacheError,
    LatentCache,
    PreparationError,
    prepare_from_folder,
)

SIZE = 16  # pixels; a multiple of every tiny pipeline's pixel multiple (Flux 4, SD3 4, Lumina 2 16)
FAMILIES = ["flux", "sd3", "lumina2", "flux2", "qwen_image", "wan"]


@pytest.fixture(scope="module")
def pipes():
    return quiet_tiny_pipelines(FAMILIES)


def make_pairs(folder, count=10, start=0, names=None):
    """``count`` distinct images (the first exactly SIZE x SIZE, the others larger, not square) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        name = names[index - start] if names else f"img{index:02d}"
        pixels = np.random.default_rng(index).integers(0, 256, size=(SIZE, SIZE, 3) if index == 0 else (20, 24, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo of cat {index}")


def prepare(pipe, folder, out_dir, **kwargs):
    kwargs = {"height": SIZE, "width": SIZE, "max_sequence_length": TEXT_LENGTH, "model_id": "tiny",
              "show_progress": False, "batch_size": 3, **kwargs}
    return prepare_from_folder(pipe, folder, out_dir, **kwargs)


def reference_text(pipe, family, prompt):
    """The family's pipeline.encode_prompt for one prompt; for "" the branch its CFG uses."""
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompt, max_sequence_length=TEXT_LENGTH)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=TEXT_LENGTH)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if family == "qwen_image":  # the pipeline's encoding, zero-padded to the cache's length, and its mask
        embeds, mask = pipe.encode_prompt(prompt, max_sequence_length=TEXT_LENGTH)
        tokens = embeds.shape[1]
        mask = torch.ones(1, tokens, dtype=torch.long) if mask is None else mask
        return {"prompt_embeds": torch.cat([embeds, embeds.new_zeros(1, TEXT_LENGTH - tokens, embeds.shape[2])], 1),
                "prompt_embeds_mask": torch.cat([mask, mask.new_zeros(1, TEXT_LENGTH - tokens)], 1)}
    if family == "flux2":  # padded by the pipeline itself
        return {"prompt_embeds": pipe.encode_prompt(prompt, max_sequence_length=TEXT_LENGTH)[0]}
    if family == "wan":  # padded by the pipeline itself
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH)
        return {"prompt_embeds": embeds}
    if prompt == "":  # Lumina 2's CFG branch encodes "" without the system prompt
        _, _, embeds, mask = pipe.encode_prompt("x", do_classifier_free_guidance=True, max_sequence_length=TEXT_LENGTH)
    else:
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                max_sequence_length=TEXT_LENGTH)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_to_cache_then_rerun_skips_all(pipes, family, tmp_path):
    pipe = pipes[family]
    make_pairs(tmp_path / "images")
    report = prepare(pipe, tmp_path / "images", tmp_path / "cache")
    assert (report.added, report.already_cached, report.failed, report.num_records) == (10, 0, [], 10)

    cache = LatentCache(tmp_path / "cache")
    assert len(cache) == 10 and len(set(cache.keys)) == 10
    batch = cache.get(torch.arange(10))
    text_keys = {"flux": {"pooled_prompt_embeds"}, "sd3": {"pooled_prompt_embeds"},
                 "lumina2": {"prompt_attention_mask"}, "flux2": set(), "qwen_image": {"prompt_embeds_mask"}, "wan": set()}
    assert set(batch) == {"latents", "prompt_embeds", *text_keys[family]}
    frames = (1,) if family == "wan" else ()  # an image is a one-frame video
    # tiny VAEs downsample by 2; FLUX.2 then patchifies 2x2 into channels
    shape = (16, SIZE // 4, SIZE // 4) if family == "flux2" else (4, *frames, SIZE // 2, SIZE // 2)
    assert batch["latents"].shape == (10, *shape)
    assert batch["prompt_embeds"].shape[:2] == (10, cache.uncond["prompt_embeds"].shape[1])

    # Latents, computed here without the image processor: (vae latent mean - shift_factor) * scaling_factor, or
    # for the 3-D VAEs (mean of the one-frame video - latents_mean) / latents_std.
    exact = cache.records.index(next(r for r in cache.records if r.source == "img00.png"))
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "images/img00.png"))).permute(2, 0, 1)[None] / 127.5 - 1
    if family == "flux2":  # 2x2 patches of the latent's mode, normalised by the VAE's batch-norm statistics
        raw = pipe._patchify_latents(pipe.vae.encode(pixels).latent_dist.mode())
        bn = pipe.vae.bn
        expected = (raw - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var + pipe.vae.config.batch_norm_eps).sqrt().view(1, -1, 1, 1)
    elif family in ("qwen_image", "wan"):
        mean = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist.mean
        stats = [torch.tensor(pipe.vae.config[k]).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std")]
        expected = ((mean - stats[0]) / stats[1]).reshape(1, *batch["latents"].shape[1:])
    else:
        mean = pipe.vae.encode(pixels).latent_dist.mean
        expected = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(batch["latents"][exact], expected[0].detach(), atol=1e-5, rtol=1e-5)

    # Text: each record's tensors equal encode_prompt(its caption); uncond equals the pipeline's "" branch.
    for name, tensor in reference_text(pipe, family, cache.records[exact].caption).items():
        torch.testing.assert_close(batch[name][exact], tensor[0], atol=1e-5, rtol=1e-5)
    reference_uncond = reference_text(pipe, family, "")
    assert (tmp_path / "cache/uncond.safetensors").is_file()
    assert set(cache.uncond) == set(reference_uncond)
    for name, tensor in reference_uncond.items():
        torch.testing.assert_close(cache.uncond[name], tensor, atol=1e-6, rtol=1e-6)

    shards_before = {path.name: path.read_bytes() for path in (tmp_path / "cache").glob("shard-*")}
    again = prepare(pipe, tmp_path / "images", tmp_path / "cache")
    assert (again.added, again.already_cached, again.num_records) == (0, 10, 10)
    assert {path.name: path.read_bytes() for path in (tmp_path / "cache").glob("shard-*")} == shards_before


def test_bad_inputs_are_named_and_good_ones_kept(pipes, tmp_path):
    pipe = pipes["flux"]
    make_pairs(tmp_path / "images", count=8)
    (tmp_path / "images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "images/broken.txt").write_text("a photo of cat")
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "images/uncaptioned.jpg")
    with pytest.raises(PreparationError) as raised:
        prepare(pipe, tmp_path / "images", tmp_path / "cache")
    message = str(raised.value)
    assert "broken.png: is not a readable image" in message and "replace or remove" in message
    assert "uncaptioned.jpg: no caption" in message and "uncaptioned.txt" in message
    assert raised.value.report.num_records == 8
    assert len(LatentCache(tmp_path / "cache")) == 8  # the good ones survived the error

    (tmp_path / "images/broken.png").unlink()
    (tmp_path / "images/uncaptioned.txt").write_text("a dog")
    fixed = prepare(pipe, tmp_path / "images", tmp_path / "cache")
    assert (fixed.added, fixed.already_cached, fixed.num_records) == (1, 8, 9)


def test_keys_are_content_based_not_positional(pipes, tmp_path):
    pipe = pipes["sd3"]
    make_pairs(tmp_path / "a")
    # Same images and captions, other file names, so a different listing order.
    make_pairs(tmp_path / "b", names=[f"z{9 - index}" for index in range(10)])
    prepare(pipe, tmp_path / "a", tmp_path / "cache_a", batch_size=4)
    prepare(pipe, tmp_path / "b", tmp_path / "cache_b", batch_size=1)
    cache_a, cache_b = LatentCache(tmp_path / "cache_a"), LatentCache(tmp_path / "cache_b")
    assert cache_a.keys != cache_b.keys and set(cache_a.keys) == set(cache_b.keys)
    rows_b = torch.tensor([cache_b.keys.index(key) for key in cache_a.keys])
    torch.testing.assert_close(cache_a.get(torch.arange(10))["latents"], cache_b.get(rows_b)["latents"],
                               atol=1e-5, rtol=1e-5)


def test_small_images_error_skip_and_upscale(pipes, tmp_path):
    pipe = pipes["flux"]
    make_pairs(tmp_path / "images", count=2)
    Image.new("RGB", (SIZE, SIZE // 2)).save(tmp_path / "images/tiny.png")
    (tmp_path / "images/tiny.txt").write_text("a cat")
    with pytest.raises(PreparationError, match=r"tiny.png: is 16x8 pixels, smaller than the 16x16.*allow_upscale"):
        prepare(pipe, tmp_path / "images", tmp_path / "cache")
    report = prepare(pipe, tmp_path / "images", tmp_path / "cache", on_error="skip")
    assert [failure.path for failure in report.failed] == ["tiny.png"] and report.num_records == 2
    upscaled = prepare(pipe, tmp_path / "images", tmp_path / "cache", allow_upscale=True)
    assert (upscaled.added, upscaled.num_records) == (1, 3)


def test_camera_orientation_is_applied(pipes, tmp_path):
    (tmp_path / "images").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": stored 16 wide x 8 high, shown 8 x 16
    Image.new("RGB", (SIZE, SIZE // 2)).save(tmp_path / "images/phone.jpg", exif=exif)
    (tmp_path / "images/phone.txt").write_text("a photo")
    (tmp_path / "images/._phone.jpg").write_bytes(b"macOS resource fork, not an image")
    with pytest.raises(PreparationError, match=r"phone.jpg: is 8x16 pixels") as raised:
        prepare(pipes["flux"], tmp_path / "images", tmp_path / "cache")
    assert len(raised.value.report.failed) == 1  # the dotfile is not an input


def test_setting_errors(pipes, tmp_path):
    pipe = pipes["flux"]
    make_pairs(tmp_path / "images", count=1)
    prepare(pipe, tmp_path / "images", tmp_path / "cache")
    with pytest.raises(CacheError, match=r"height=16 \(asked 32\), width=16 \(asked 32\)"):
        prepare(pipe, tmp_path / "images", tmp_path / "cache", height=32, width=32)
    with pytest.raises(ValueError, match="height=18 must be a positive multiple of 4"):
        prepare(pipe, tmp_path / "images", tmp_path / "other", height=18)
    with pytest.raises(ValueError, match="pass model_id"):
        prepare(pipe, tmp_path / "images", tmp_path / "other", model_id=None)
    with pytest.raises(ValueError, match="on_error"):
        prepare(pipe, tmp_path / "images", tmp_path / "other", on_error="ignore")
    with pytest.raises(ValueError, match="no model family for a object"):
        prepare(object(), tmp_path / "images", tmp_path / "other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        prepare(pipe, tmp_path / "empty", tmp_path / "other")


def test_every_image_mode_prepares_and_bad_captions_are_named(pipes, tmp_path):
    """RGBA, LA, palette, 16-bit grey, CMYK and 1-bit images are encoded (a fully transparent image as the white
    one it shows); an empty and a non-UTF-8 caption are reported by name while the rest is cached."""
    folder = tmp_path / "images"
    folder.mkdir()
    white = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    images = {
        "white.png": white,
        "transparent.png": Image.new("RGBA", (SIZE, SIZE), (12, 34, 56, 0)),
        "grey_alpha.png": Image.new("LA", (SIZE, SIZE), (90, 255)),
        "palette.png": Image.new("P", (SIZE, SIZE), 3),
        "grey16.png": Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (SIZE, SIZE), (0, 128, 255, 0)),
        "bits.png": Image.new("1", (SIZE, SIZE), 1),
        "empty.png": white,
        "latin1.png": white,
    }
    for name, image in images.items():
        image.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"a photo of {Path(name).stem}")
    (folder / "empty.txt").write_text("")
    (folder / "latin1.txt").write_bytes("un caf\xe9".encode("latin-1"))
    report = prepare(pipes["sd3"], folder, tmp_path / "cache", on_error="skip")
    failed = {item.path: item.reason for item in report.failed}
    assert set(failed) == {"empty.png", "latin1.png"}
    assert "empty.txt is empty" in failed["empty.png"] and "not UTF-8" in failed["latin1.png"]
    cache = LatentCache(tmp_path / "cache")
    assert len(cache) == 7
    latents = {record.source: cache.tensors["latents"][index] for index, record in enumerate(cache.records)}
    same = dict(rtol=0, atol=1e-5)  # images encoded in different batches differ in the last float bits
    torch.testing.assert_close(latents["transparent.png"], latents["white.png"], **same)
    torch.testing.assert_close(latents["bits.png"], latents["white.png"], **same)
    assert (latents["grey16.png"] - latents["white.png"]).abs().max() > 0.01  # 40000/65535 grey, not white
