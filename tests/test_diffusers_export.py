"""Export and inference: the exported LoRA in a stock diffusers pipeline equals the library's own sampler."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open

from diffusers_fixtures import FAMILY_NAMES, SEQUENCE_LENGTH, tiny_latents, tiny_pipeline, tiny_transformer
from shortcutfm.core import euler_sample
from shortcutfm.models.diffusers import (
    EMA_WEIGHTS, STUDENT_WEIGHTS, LoraSettings, LoraStudent, export_lora, get_family, sample_with_pipeline,
    sampling_grid,
)

torch.set_num_threads(1)
diffusers_logging.set_verbosity_error()
PROMPTS = ["a photo of a cat", "red tree in the sky"]


def trained_student(family, pipe, seed=1):
    """A student whose LoRA (rank 4, alpha 8: tests the stored alpha) and slow EMA are non-zero and differ."""
    fam = get_family(family)
    encoding = fam.encode_prompts(pipe, PROMPTS, max_sequence_length=SEQUENCE_LENGTH[family])
    student = LoraStudent(fam.velocity(tiny_transformer(family)), fam, lora=LoraSettings(rank=4, alpha=8),
                          uncond=encoding.uncond)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for shadows in (student.trainable_tensors(), student.emas.slow.shadow):
            for tensor in shadows.values():
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return student, encoding


def library_sample(student, encoding, velocity, noise, num_steps=3):
    fam = student.family
    grid = sampling_grid(fam, num_steps, *noise.shape[-2:])
    return euler_sample(velocity, noise, grid, **fam.sampling_cond(encoding.cond)).x


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_exported_lora_in_pipeline_matches_library_sampler(family, tmp_path):
    pipe = tiny_pipeline(family)
    student, encoding = trained_student(family, pipe)
    paths = export_lora(student, tmp_path)
    assert [p.name for p in paths] == [STUDENT_WEIGHTS, EMA_WEIGHTS]
    with safe_open(str(paths[0]), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k and ".student" not in k for k in keys)

    pipe.load_lora_weights(tmp_path, adapter_name="scfm")
    noise = tiny_latents(family, batch=2, seed=3)
    scheduler = pipe.scheduler
    out = sample_with_pipeline(pipe, PROMPTS, num_steps=3, latents=noise,
                               max_sequence_length=SEQUENCE_LENGTH[family])
    assert pipe.scheduler is scheduler  # the pipeline's own scheduler is put back
    expected = library_sample(student, encoding, student.velocity(), noise)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    teacher = library_sample(student, encoding, student.target_velocities().teacher, noise)
    assert (out - teacher).abs().max() > 1e-2  # the LoRA matters: the comparison is not vacuous


def test_ema_file_and_lora_scale(tmp_path):
    family = "sd3"
    pipe = tiny_pipeline(family)
    student, encoding = trained_student(family, pipe)
    export_lora(student, tmp_path)
    pipe.load_lora_weights(tmp_path, weight_name=EMA_WEIGHTS, adapter_name="scfm_ema")
    noise = tiny_latents(family, batch=2, seed=4)
    kwargs = dict(num_steps=2, shift=2.0, latents=noise, max_sequence_length=SEQUENCE_LENGTH[family])
    out = sample_with_pipeline(pipe, PROMPTS, lora_scale=1.5, **kwargs)
    student.module.lora_scale = 1.5
    fam = student.family
    grid = sampling_grid(fam, 2, 8, 8, shift=2.0)
    expected = euler_sample(student.ema_velocity(), noise, grid, **encoding.cond).x
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_flux_dynamic_grid_and_guidance_value():
    pipe = tiny_pipeline("flux")
    fam = get_family("flux")
    grid = sampling_grid(fam, 4, 64, 64)  # 1024 tokens: mu = 0.5 + 0.65 * 768 / 3840
    mu = 0.5 + 0.65 * (1024 - 256) / (4096 - 256)
    base = torch.linspace(1, 0, 5, dtype=torch.float64)
    shifted = torch.exp(torch.tensor(mu, dtype=torch.float64)) * base / (1 + (torch.exp(torch.tensor(mu)) - 1) * base)
    torch.testing.assert_close(grid[1:], shifted[1:].to(grid.dtype))
    assert fam.guidance.pipeline_kwargs() == {"guidance_scale": 3.5}
    assert get_family("sd3").guidance.pipeline_kwargs(2.0) == {"guidance_scale": 3.0}
    with pytest.raises(ValueError, match="latents="):
        sample_with_pipeline(pipe, PROMPTS, num_steps=2)


def test_fused_lora_samples_like_the_unfused_one_with_plain_base_passes(tmp_path):
    """fuse_lora folds the LoRA at its scale into the base: the same samples as the unfused LoRA at that scale,
    and no adapter layer is left, so each step is one plain transformer pass."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from shortcutfm.models.diffusers import fuse_lora

    family = "sd3"
    pipe = tiny_pipeline(family)
    student, _ = trained_student(family, pipe)
    export_lora(student, tmp_path)
    kwargs = dict(num_steps=3, latents=tiny_latents(family, batch=2, seed=5), max_sequence_length=SEQUENCE_LENGTH[family])
    pipe.load_lora_weights(tmp_path, adapter_name="scfm")
    unfused = sample_with_pipeline(pipe, PROMPTS, lora_scale=1.3, **kwargs)
    fuse_lora(pipe, "scfm", 1.3)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    fused = sample_with_pipeline(pipe, PROMPTS, lora_scale=1.0, **kwargs)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)
    base = tiny_pipeline(family)  # and the fusion is not a no-op
    assert (sample_with_pipeline(base, PROMPTS, **kwargs) - fused).abs().max() > 1e-2
