"""Aspect-ratio buckets: bucket sizes, nearest-bucket assignment, a bucketed cache from `prepare --images
--buckets`, batches that never mix shapes, and a LoRA trained on it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffusers_fixtures import SEQUENCE_LENGTH, tiny_pipeline
from shortcutfm.cli import app
from shortcutfm.config import load_config
from shortcutfm.preparation.buckets import BucketedCache, bucket_sizes, nearest_bucket, open_cache
from shortcutfm.workflows import resolve_config_path, run_training

torch.set_num_threads(1)


def test_bucket_sizes_keep_the_area_and_the_multiple():
    sizes = bucket_sizes(512, 512, 64)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0 and 0.5 <= w / h <= 2.0
        assert abs(h * w - 512 * 512) <= 64 * max(h, w)  # within one multiple of the target area
    assert nearest_bucket(1080, 1920, sizes) == min(sizes, key=lambda s: abs(s[1] / s[0] - 1920 / 1080))
    assert nearest_bucket(1000, 1000, sizes) == (512, 512)


@pytest.fixture()
def bucketed(tmp_path):
    pipe_dir = tmp_path / "pipe"
    tiny_pipeline("sd3").save_pretrained(pipe_dir)
    images = tmp_path / "images"
    images.mkdir()
    shapes = [(32, 32), (32, 32), (24, 48), (24, 48), (24, 48), (48, 24)]  # (H, W): square, landscape, portrait
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3)).astype(np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of {['cat', 'dog'][i % 2]}")
    result = CliRunner().invoke(app, ["prepare", "--pipeline", str(pipe_dir), "--images", str(images), "--out",
                                      str(tmp_path / "cache"), "--height", "16", "--width", "16", "--buckets",
                                      "--max-sequence-length", str(SEQUENCE_LENGTH["sd3"])])
    assert result.exit_code == 0, result.output
    return tmp_path, pipe_dir


def test_prepare_buckets_by_aspect_and_batches_never_mix_shapes(bucketed):
    tmp_path, _ = bucketed
    cache = open_cache(tmp_path / "cache")
    assert isinstance(cache, BucketedCache) and len(cache) == 6
    shapes = {b.path.name: (len(b), tuple(b.get(torch.arange(1))["latents"].shape[-2:])) for b in cache.buckets}
    assert shapes["bucket-16x16"][0] == 2  # the two square images
    landscape = [n for n, (count, (h, w)) in shapes.items() if w > h]
    portrait = [n for n, (count, (h, w)) in shapes.items() if h > w]
    assert [shapes[n][0] for n in landscape] == [3] and [shapes[n][0] for n in portrait] == [1]
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        batch = cache.get(torch.randint(len(cache), (4,), generator=generator))["latents"]
        seen.add(tuple(batch.shape[-2:]))
    assert len(seen) == 3  # every bucket is drawn, each batch one shape

def test_a_second_prepare_run_adds_nothing(bucketed):
    tmp_path, pipe_dir = bucketed
    before = open_cache(tmp_path / "cache").keys
    result = CliRunner().invoke(app, ["prepare", "--pipeline", str(pipe_dir), "--images", str(tmp_path / "images"),
                                      "--out", str(tmp_path / "cache"), "--height", "16", "--width", "16", "--buckets",
                                      "--max-sequence-length", str(SEQUENCE_LENGTH["sd3"])])
    assert result.exit_code == 0 and "0 records added, 6 already cached" in result.output, result.output
    assert open_cache(tmp_path / "cache").keys == before


def test_a_lora_trains_on_a_bucketed_cache(bucketed):
    tmp_path, pipe_dir = bucketed
    config = load_config(resolve_config_path("sd3"), [
        f"data.source={tmp_path / 'cache'}", f"model.pretrained={pipe_dir}", "model.dtype=float32",
        'train.mixed_precision="no"', "lora.rank=2", "lora.alpha=2", "train.steps=4", "train.batch_size=2",
        "jumps.teacher_grid=4", "jumps.self_grids=[2,4]", "eval.every=0", f"train.output_dir={tmp_path / 'run'}"])
    result = run_training(config, progress=False)
    assert result.state.step == 4 and (result.model_dir / "pytorch_lora_weights.safetensors").is_file()
