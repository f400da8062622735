"""The bundled t2i teacher: small files, loadable offline, and still a good text-to-image model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from shortcutfm.t2i import evaluate as ev
from shortcutfm.t2i import judge as judging
from shortcutfm.t2i.pipeline import MARKER, T5_LENGTH, decode

torch.set_num_threads(1)


def test_every_bundled_file_is_at_most_5_mb():
    files = [p for p in ev.ASSETS.rglob("*") if p.is_file()]
    assert files and (ev.BUNDLED_PIPELINE / MARKER).is_file()
    assert max(p.stat().st_size for p in files) <= 5 * 1024 * 1024


def test_bundled_teacher_follows_held_out_prompts(tmp_path):
    from shortcutfm.sampling import load_pipeline

    pipe = load_pipeline(str(ev.BUNDLED_PIPELINE))
    judge_model, _ = ev.world_judge(tmp_path, progress=False)
    prompts = ev.prompt_set(pipe, ev.held_out_prompts(64, seed=77), 77, T5_LENGTH)
    velocity = ev.guided_velocity(pipe.transformer, prompts.uncond, 1.0)
    latents, _ = ev.sample_latents(velocity, prompts, 8, 3.0)
    images = decode(pipe.vae, latents)
    assert judging.adherence(judge_model, images, prompts.scenes) >= 0.9
    other_prompts = ev.prompt_set(pipe, ev.held_out_prompts(64, seed=78), 77, T5_LENGTH)
    assert judging.adherence(judge_model, images, other_prompts.scenes) < 0.75  # it follows *its* prompts
