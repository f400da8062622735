"""`shortcutfm eval` for any diffusers pipeline plus an SCFM LoRA: torchmetrics FID (a small feature extractor
stands in for Inception offline) against the teacher's 32-step images and a reference folder, torchmetrics CLIP
score (a tiny CLIP built from config), seconds per image, and the report files."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from diffusers_fixtures import VOCAB_SIZE, tiny_pipeline, tiny_tokenizer
from shortcutfm.cli import app
from shortcutfm.evaluation.lora_eval import LoraEvalSettings, _TensorFeatures, evaluate_lora, frechet_distance
from shortcutfm.models.diffusers import LoraSettings, LoraStudent, export_lora

torch.set_num_threads(1)
PROMPTS = ["a photo of a cat", "red tree in the sky", "a dog", "a photo of a dog"]


class SmallFeatures(nn.Module):
    """A fixed random conv feature extractor with ``num_features`` (what torchmetrics needs of a custom one)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images):
        return self.net(images.float())


def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tiny_tokenizer(32))
    return _TensorFeatures(model), processor


@pytest.fixture(scope="module")
def pipeline_and_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_eval")
    tiny_pipeline("sd3").save_pretrained(root / "pipe")
    student = LoraStudent.from_pretrained("sd3", str(root / "pipe"), lora=LoraSettings(rank=4, alpha=4),
                                          dtype=torch.float32, guidance_scale=0.0, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in student.trainable_tensors().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    export_lora(student, root / "lora")
    references = root / "reference"
    references.mkdir()
    for i in range(5):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 20, 3)).astype(np.uint8)).save(references / f"{i}.png")
    return root


def settings(root, **kwargs):
    values = dict(pipeline=str(root / "pipe"), lora_dir=str(root / "lora"), prompts=PROMPTS, steps=(1, 2),
                  teacher_steps=4, height=16, width=16, max_sequence_length=16, batch_size=2,
                  reference_dir=str(root / "reference"))
    values.update(kwargs)
    return LoraEvalSettings(**values)


def test_fid_clip_and_latency_rows_with_the_report(pipeline_and_lora, tmp_path):
    report = evaluate_lora(settings(pipeline_and_lora), tmp_path / "out", fid_features=SmallFeatures(), clip=tiny_clip,
                           progress=False)
    found = {(r.model, r.steps, r.metric): r.value for r in report.rows}
    for steps in (1, 2):
        for metric in ("fid_teacher", "fid_reference", "clip_score", "seconds_per_image"):
            assert ("student", steps, metric) in found
    assert ("teacher", 4, "fid_teacher") not in found and ("teacher", 4, "fid_reference") in found
    assert all(r.nfe == 2 * r.steps for r in report.rows)  # SD3's real CFG: two passes per step
    teacher = report.images[("teacher", 4)]
    student = report.images[("student", 1)]
    assert found[("student", 1, "fid_teacher")] == pytest.approx(frechet_distance(student, teacher, SmallFeatures()))
    from torchmetrics.multimodal.clip_score import CLIPScore

    direct = CLIPScore(model_name_or_path=tiny_clip)
    direct.update((student * 255).round().to(torch.uint8), PROMPTS)
    assert found[("student", 1, "clip_score")] == pytest.approx(float(direct.compute()), rel=1e-5)
    for name in ("report.md", "metrics.json", "eval_settings.json", "samples.png", "fid_teacher_vs_steps.png"):
        assert (tmp_path / "out" / name).is_file(), name
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())["rows"]
    assert {"model", "sampler", "steps", "nfe", "shift", "metric", "value"} <= set(rows[0])


def test_fid_teacher_is_zero_for_the_teacher_itself_and_positive_for_the_lora(pipeline_and_lora, tmp_path):
    """The defining property: with the LoRA at scale 0 the 'student' at the teacher's step count is the teacher
    (same noise), so its FID against the teacher vanishes; the trained LoRA's does not."""
    features = SmallFeatures()
    off = evaluate_lora(settings(pipeline_and_lora, steps=(4,), lora_scale=0.0, reference_dir=None), tmp_path / "a",
                        fid_features=features, progress=False)
    on = evaluate_lora(settings(pipeline_and_lora, steps=(4,), reference_dir=None), tmp_path / "b",
                       fid_features=features, progress=False)
    value = {r.metric: r.value for r in off.rows if r.model == "student"}["fid_teacher"]
    trained = {r.metric: r.value for r in on.rows if r.model == "student"}["fid_teacher"]
    assert abs(value) < 1e-6 and trained > 1e-4, (value, trained)


def test_cli_eval_of_a_pipeline_and_a_lora(pipeline_and_lora, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--pipeline", str(pipeline_and_lora / "pipe"), "--lora",
                                 str(pipeline_and_lora / "lora"), "--prompts", str(prompts), "--steps", "1,2",
                                 "--no-fid", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "cli" / "metrics.json").read_text())["rows"]
    assert {(r["model"], r["steps"]) for r in rows} == {("teacher", 32), ("student", 1), ("student", 2)}
    bad = runner.invoke(app, ["eval", "--pipeline", str(pipeline_and_lora / "pipe"), "--lora",
                              str(pipeline_and_lora / "lora"), "--prompts", str(tmp_path / "absent.txt"), "--no-fid"])
    assert bad.exit_code == 2 and "absent.txt" in bad.output and "Traceback" not in bad.output


def test_inception_fid_without_torch_fidelity_is_a_one_line_error(pipeline_and_lora, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_fidelity" else real(name, *a))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = CliRunner().invoke(app, ["eval", "--pipeline", str(pipeline_and_lora / "pipe"), "--lora",
                                      str(pipeline_and_lora / "lora"), "--prompts", str(prompts)])
    assert result.exit_code == 2 and "pip install torch-fidelity" in result.output and "--no-fid" in result.output
