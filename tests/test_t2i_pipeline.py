"""The world's SD3 pipeline: tokenizers, save/load without T5, from-scratch diffusers training, caption dropout,
and a tiny prepare -> pretrain -> prepare -> distill -> eval run through the CLI."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shortcutfm.config import load_config  # noqa: E402
from shortcutfm.t2i import world  # noqa: E402
from shortcutfm.t2i.pipeline import (  # noqa: E402
    MARKER, TEXT_LENGTH, TransformerShape, build_base_pipeline, build_vae, save_pipeline, world_tokenizer,
)
from shortcutfm.training.diffusers_setup import caption_dropout  # noqa: E402

torch.set_num_threads(1)
TINY = TransformerShape(num_layers=1, num_attention_heads=2, attention_head_dim=8)


def test_tokenizer_knows_every_word_and_fits_the_longest_caption():
    tokenizer = world_tokenizer()
    longest = max((world.caption(s, t) for s in world.random_scenes(500, 0, "all") for t in range(3)), key=len)
    ids = tokenizer([longest]).input_ids[0]
    assert tokenizer.unk_token_id not in ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) <= TEXT_LENGTH
    assert tokenizer.unk_token_id not in tokenizer([" ".join(world.vocabulary())]).input_ids[0]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    base = save_pipeline(build_base_pipeline(build_vae(0), TINY), root / "base")
    return root, base


def test_saved_pipeline_loads_without_t5_and_is_marked(tiny_world):
    from shortcutfm.sampling import load_pipeline

    _, base = tiny_world
    index = json.loads((base / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and (base / MARKER).is_file()
    pipe = load_pipeline(str(base))
    assert pipe.text_encoder_3 is None and pipe.transformer.config.patch_size == 4
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=["a small red circle at the top left on a black background"],
                                              prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
                                              max_sequence_length=4)
    assert embeds.shape == (1, TEXT_LENGTH + 4, 64) and pooled.shape == (1, 64)
    other, _, _, _ = pipe.encode_prompt(prompt=["a small blue circle at the top left on a black background"],
                                        prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                                        max_sequence_length=4)
    assert not torch.allclose(embeds, other)  # the words matter


def test_caption_dropout_rate_and_replacement():
    uncond = {"prompt_embeds": torch.full((1, 3, 2), 7.0), "pooled_prompt_embeds": torch.full((1, 2), 7.0)}
    cond = {"prompt_embeds": torch.zeros(4000, 3, 2), "pooled_prompt_embeds": torch.zeros(4000, 2)}
    out = caption_dropout(uncond, 0.25)(cond, torch.Generator().manual_seed(0))
    dropped = out["pooled_prompt_embeds"][:, 0] == 7.0
    assert torch.equal(dropped, out["prompt_embeds"][:, 0, 0] == 7.0)  # both tensors of a row together
    assert abs(dropped.double().mean().item() - 0.25) < 5 * (0.25 * 0.75 / 4000) ** 0.5
    assert caption_dropout(uncond, 0.0)(cond, torch.Generator()) is cond


def _run(*args):
    from typer.testing import CliRunner

    from shortcutfm.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    return result


def test_prepare_pretrain_distill_eval_end_to_end(tiny_world, tmp_path, monkeypatch):
    """The whole user path on a tiny world pipeline, through the CLI (well under a minute)."""
    from safetensors.torch import load_file

    root, base = tiny_world
    _run("world", "images", tmp_path / "images", "--count", "12")
    _run("prepare", "--pipeline", base, "--images", tmp_path / "images", "--out", tmp_path / "real",
         "--max-sequence-length", "4")
    _run("train", "t2i-teacher", f"data.source={tmp_path / 'real'}", f"model.pretrained={base}",
         f"train.output_dir={tmp_path / 'teacher'}", "train.steps=4", "train.batch_size=4", "train.checkpoint_every=2",
         "optim.warmup_steps=1")
    teacher = tmp_path / "teacher" / "model"
    assert (teacher / MARKER).is_file() and (teacher / "vae").is_dir()
    # the exported transformer is the EMA of the trained weights, not the start and not the live weights
    exported = load_file(teacher / "transformer" / "diffusion_pytorch_model.safetensors")
    start = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(exported[k], start[k]) for k in exported)
    _run("world", "prompts", tmp_path / "prompts.txt", "--count", "6")
    _run("prepare", "--pipeline", teacher, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "made",
         "--max-sequence-length", "4")
    _run("train", "t2i", f"data.source={tmp_path / 'made'}", f"model.pretrained={teacher}",
         f"train.output_dir={tmp_path / 'student'}", "train.steps=4", "train.batch_size=4", "eval.every=2",
         "eval.num_samples=8", "train.checkpoint_every=0")
    state = json.loads((tmp_path / "student" / "trainer_state.json").read_text())
    assert [h["metric"] for h in state["history"]] == ["fd_teacher@3 (training prompts)"] * 2
    _run("sample", tmp_path / "student", "--prompt", "a small red circle at the top left on a black background",
         "--steps", "3", "--out", tmp_path / "sample.png")
    from PIL import Image

    assert Image.open(tmp_path / "sample.png").size == (32, 32)
    monkeypatch.setenv("SHORTCUTFM_CACHE", str(tmp_path / "cache"))
    _run("eval", tmp_path / "student", "--out", tmp_path / "eval", "--num-prompts", "12")
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["rows"]
    keys = {(r["model"], r["sampler"], r["steps"], r["metric"]) for r in rows}
    for steps in (1, 2, 3, 4, 8, 16):
        assert ("student", "euler", steps, "fd_teacher") in keys
    assert ("teacher", "heun", 3, "adherence") in keys and ("data", "-", 0, "fd_data") in keys
    nfe = {(r["model"], r["sampler"], r["steps"]): r["nfe"] for r in rows}
    assert nfe[("student", "euler", 3)] == 6 and nfe[("teacher", "heun", 3)] == 10  # both CFG passes counted
    assert (tmp_path / "eval" / "samples.png").is_file() and (tmp_path / "eval" / "report.md").is_file()


def test_eval_of_a_run_off_the_proving_ground_asks_for_prompts(tmp_path):
    """Without --prompts, `eval RUN` has the world's exact metrics only for world pipelines; elsewhere it asks for a
    prompt file (FID / CLIP evaluation)."""
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(None, ["model.kind=sd3", "model.pretrained=somewhere/else"])
    from shortcutfm.config import save_config

    save_config(config, run / "config.yaml")
    from typer.testing import CliRunner

    from shortcutfm.cli import app

    result = CliRunner().invoke(app, ["eval", str(run)])
    assert result.exit_code == 2 and "give --prompts FILE" in result.output


def test_pretrain_needs_a_local_pipeline_folder(tmp_path):
    from shortcutfm.training.diffusers_setup import diffusers_pretrain_setup

    root = Path(tmp_path)
    config = load_config(None, ["model.kind=sd3", "train.mode=pretrain", f"model.pretrained={root / 'nowhere'}",
                                f"data.source={root / 'nocache'}"])
    with pytest.raises(Exception, match="nocache|manifest"):
        diffusers_pretrain_setup(config)
