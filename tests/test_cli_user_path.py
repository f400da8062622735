"""What a new user meets first: --version, every preset in --help, a rerun into an old run's folder, a missing
tracker, inputs checked before a pipeline is loaded, and sample's --height/--width."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from shortcutfm.cli import app
from shortcutfm.workflows import PRESETS_DIR

runner = CliRunner()
TINY = ["model.width=16", "model.depth=1", "train.batch_size=32", "data.num_toy_samples=500", "data.source=checkerboard",
        "train.log_every=1"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_every_preset_in_train_help():
    from shortcutfm import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"shortcutfm {__version__}"
    help_text = " ".join(run("train", "--help").output.split())
    for preset in PRESETS_DIR.glob("*.yaml"):
        assert preset.stem in help_text, preset.stem


def test_fresh_run_into_an_old_runs_folder_is_refused_unless_resume_or_overwrite(tmp_path):
    out = f"train.output_dir={tmp_path / 'run'}"
    assert run("train", "pretrain", *TINY, out, "train.steps=3").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    refused = run("train", "pretrain", *TINY, out, "train.steps=2")
    assert refused.exit_code == 2 and "holds another run (checkpoints up to step-00000003)" in refused.output
    assert "--resume" in refused.output and "--overwrite" in refused.output
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before  # nothing pruned
    assert run("train", "pretrain", *TINY, out, "train.steps=5", "--resume").exit_code == 0
    replaced = run("train", "pretrain", *TINY, out, "train.steps=2", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]
    both = run("train", "pretrain", *TINY, out, "--resume", "--overwrite")
    assert both.exit_code == 2 and "not both" in both.output


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_tracker_package_is_an_error_not_a_warning(tmp_path):
    result = run("train", "pretrain", *TINY, f"train.output_dir={tmp_path / 'run'}", "train.steps=2",
                 "train.tracker=wandb")
    assert result.exit_code == 2 and "the wandb package is not installed; pip install wandb" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prepare_checks_its_inputs_before_loading_the_pipeline(tmp_path, monkeypatch):
    import shortcutfm.sampling as sampling

    def never(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the inputs were checked")

    monkeypatch.setattr(sampling, "load_pipeline", never)
    missing = run("prepare", "--pipeline", "black-forest-labs/FLUX.1-dev", "--out", tmp_path / "c", "--prompts",
                  tmp_path / "absent.txt")
    assert missing.exit_code == 2 and "absent.txt not found" in missing.output
    (tmp_path / "empty").mkdir()
    empty = run("prepare", "--pipeline", "black-forest-labs/FLUX.1-dev", "--out", tmp_path / "c", "--images",
                tmp_path / "empty")
    assert empty.exit_code == 2 and "holds no images" in empty.output
    (tmp_path / "p.txt").write_text("a cat\n")
    size = run("prepare", "--pipeline", "x", "--out", tmp_path / "c", "--prompts", tmp_path / "p.txt", "--height", "0")
    assert size.exit_code == 2 and "--height must be a positive" in size.output


def test_sample_height_and_width_are_for_diffusers_loras(tmp_path):
    assert run("train", "pretrain", *TINY, f"train.output_dir={tmp_path / 'run'}", "train.steps=2").exit_code == 0
    result = run("sample", tmp_path / "run", "--height", "64", "--out", tmp_path / "s.npz")
    assert result.exit_code == 2 and "--height/--width are for diffusers LoRAs" in result.output
