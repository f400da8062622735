"""A quantized frozen base (model.quantize=int8: torchao weight-only on the CPU) under float32 LoRA adapters, and
the 8-bit AdamW option: the teacher pass equals the dequantized weights' pass, only the adapters train, a run
trains and resumes, and the exported LoRA loads on an unquantized base."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_fixtures import SEQUENCE_LENGTH, tiny_cond, tiny_latents, tiny_pipeline
from shortcutfm.config import ConfigError, load_config
from shortcutfm.models.diffusers import LoraSettings, LoraStudent, get_family, load_transformer
from shortcutfm.models.diffusers.quantization import dequantized_weight, quantization_config, quantized_linears
from shortcutfm.preparation import prepare_from_folder
from shortcutfm.sampling import load_pipeline
from shortcutfm.workflows import resolve_config_path, run_training

pytest.importorskip("torchao")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*only bfloat16 is supported.*")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quant") / "pipe"
    tiny_pipeline("sd3").save_pretrained(directory)
    return directory


def quantized_student(pipe_dir, **kwargs):
    return LoraStudent.from_pretrained("sd3", str(pipe_dir), lora=LoraSettings(rank=4, alpha=4), dtype=torch.float32,
                                       quantize="int8", guidance_scale=0.0, gradient_checkpointing=False, **kwargs)


def test_the_quantized_teacher_computes_with_the_dequantized_weights(pipe_dir):
    student = quantized_student(pipe_dir)
    names = quantized_linears(student.transformer)
    assert len(names) > 10 and all("lora" not in n for n in names)
    # a float32 copy of the base whose linears hold the dequantized weights
    reference = load_transformer("sd3", str(pipe_dir), dtype=torch.float32)
    original = load_transformer("sd3", str(pipe_dir), dtype=torch.float32)
    quantized = dict(student.transformer.named_modules())
    with torch.no_grad():
        for name in names:
            base_name = name.replace(".base_layer", "")
            dict(reference.named_modules())[base_name].weight.copy_(dequantized_weight(quantized[name]))
    x, sigma, cond = tiny_latents("sd3"), torch.tensor([0.7, 0.2]), tiny_cond("sd3")
    with torch.no_grad():
        teacher = student.target_velocities().teacher(x, sigma, **cond)
        exact = get_family("sd3").velocity(reference)(x, sigma, **cond)
        float_base = get_family("sd3").velocity(original)(x, sigma, **cond)
    torch.testing.assert_close(teacher, exact, atol=1e-5, rtol=1e-4)
    error = (teacher - float_base).abs().max() / float_base.std()
    assert 0 < error < 0.05, error  # int8 weights: a small, non-zero change of the base


def test_only_the_float32_adapters_train_on_a_quantized_base(pipe_dir):
    student = quantized_student(pipe_dir)
    assert all(t.dtype == torch.float32 and t.requires_grad for t in student.trainable_tensors().values())
    x, sigma, cond = tiny_latents("sd3"), torch.tensor([0.7, 0.2]), tiny_cond("sd3")
    student.velocity()(x, sigma, **cond).pow(2).mean().backward()
    with_grad = {n for n, p in student.transformer.named_parameters() if p.grad is not None}
    assert with_grad and all(".student." in n for n in with_grad)


def test_a_quantized_run_trains_and_its_lora_loads_on_an_unquantized_base(pipe_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a photo of a cat")
    pipe = load_pipeline(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    prepare_from_folder(pipe, images, tmp_path / "cache", height=16, width=16,
                        max_sequence_length=SEQUENCE_LENGTH["sd3"], show_progress=False)
    config = load_config(resolve_config_path("sd3"), [
        f"data.source={tmp_path / 'cache'}", f"model.pretrained={pipe_dir}", "model.dtype=float32",
        "model.quantize=int8", 'train.mixed_precision="no"', "lora.rank=4", "lora.alpha=4", "train.steps=3",
        "train.batch_size=2", "jumps.teacher_grid=4", "jumps.self_grids=[2,4]", "eval.every=0", "optim.lr=1e-2",
        f"train.output_dir={tmp_path / 'run'}"])
    result = run_training(config, progress=False)
    exported = load_file(str(result.model_dir / "pytorch_lora_weights.safetensors"))
    assert exported and all(v.dtype == torch.float32 for v in exported.values())
    assert any(v.abs().max() > 0 for k, v in exported.items() if "lora_B" in k)  # it trained
    plain = load_pipeline(str(pipe_dir))  # an unquantized base
    plain.load_lora_weights(str(result.model_dir), adapter_name="scfm")
    loaded = {n for n, _ in plain.transformer.named_parameters() if ".scfm." in n}
    assert len(loaded) == len(exported)


def test_quantization_and_optimizer_settings_are_checked():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA GPU"):
            quantization_config("nf4")
    with pytest.raises(ConfigError, match="model.quantize"):
        load_config(None, ["model.kind=sd3", "model.pretrained=p", "model.quantize=int4"])
    with pytest.raises(ConfigError, match="model.quantize"):
        load_config(None, ["model.quantize=int8"])  # a built-in network has no frozen base


def test_adamw8bit_trains_and_resumes_exactly(tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_training import pretrain_config  # the tiny built-in set-up

    straight = run_training(pretrain_config(tmp_path / "a", steps=6, extra=["optim.optimizer=adamw8bit",
                                                                          "train.checkpoint_every=3"]), progress=False)
    config = pretrain_config(tmp_path / "b", steps=6, extra=["optim.optimizer=adamw8bit", "train.checkpoint_every=3"])
    import dataclasses

    halfway = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3))
    run_training(halfway, progress=False)
    resumed = run_training(config, resume=True, progress=False)
    a = load_file(str(straight.run_dir / "final" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = run_training(pretrain_config(tmp_path / "c", steps=6), progress=False)
    c = load_file(str(plain.run_dir / "final" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the 8-bit states change the trajectory
