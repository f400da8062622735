"""The command line: one-line errors for bad input (exit code 2), and the sample command on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from shortcutfm.cli import app

runner = CliRunner()
TINY = ["model.width=16", "model.depth=1", "train.batch_size=32", "data.num_toy_samples=500"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "distill", "train.stepz=3"], "did you mean train.steps"),
        (["train", "distill", "train.steps=many"], "train.steps: expected an integer"),
        (["train", "distill", "jumps.t_skip=3"], "jumps.t_skip must be an even number"),
        (["train", "no_such_config.yaml"], "neither a file nor a preset"),
        (["train", "distill", "train.teacher="], "train.teacher must name"),
        (["train", "pretrain", "data.source=imagenet"], "imagenet"),
    ],
)
def test_bad_config_gives_one_clear_error(args, expected, tmp_path):
    result = run(*args, f"train.output_dir={tmp_path}")
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"x": np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]])}, "NaN"),
        ({"data": np.zeros((10, 2))}, "no array 'x'"),
        ({"x": np.zeros((10, 2)), "y": np.array([0.5] * 10)}, "y"),
        ({"x": np.zeros((10, 2, 2, 2, 2))}, "x"),
    ],
)
def test_bad_data_files_name_the_file(arrays, expected, tmp_path):
    path = _npz(tmp_path / "mine.npz", **arrays)
    result = run("train", "pretrain", f"data.source={path}", f"train.output_dir={tmp_path / 'run'}", *TINY)
    assert result.exit_code == 2, result.output
    assert "mine.npz" in result.output and expected in result.output


def test_missing_and_malformed_data_files(tmp_path):
    result = run("train", "pretrain", f"data.source={tmp_path / 'absent.npz'}", f"train.output_dir={tmp_path}")
    assert result.exit_code == 2 and "absent.npz" in result.output
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip file")
    result = run("train", "pretrain", f"data.source={broken}", f"train.output_dir={tmp_path}")
    assert result.exit_code == 2 and "broken.npz" in result.output


def test_train_then_sample_a_users_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 0.5, (200, 3)), rng.normal(3, 0.5, (200, 3))]).astype(np.float32) * 10 + 100
    y = np.repeat([0, 1], 200)
    data = _npz(tmp_path / "users.npz", x=x, y=y)
    result = run("train", "pretrain", f"data.source={data}", f"train.output_dir={tmp_path / 'run'}", "train.steps=5", *TINY)
    assert result.exit_code == 0, result.output
    out = tmp_path / "s.npz"
    result = run("sample", tmp_path / "run", "--steps", 2, "--num", 10, "--label", 1, "--out", out)
    assert result.exit_code == 0, result.output
    samples = np.load(out)
    assert samples["x"].shape == (10, 3) and (samples["y"] == 1).all()
    assert abs(samples["x"].mean() - 100) < 60  # mapped back to the user's units, not model space
    assert out.with_suffix(".png").is_file()
    result = run("sample", tmp_path / "run", "--label", 7, "--out", out)
    assert result.exit_code == 2 and "--label" in result.output
    # eval finds the teacher's data (the user's file) by itself
    result = run("eval", "--teacher", tmp_path / "run", "--out", tmp_path / "eval", "eval.sweep_samples=100",
                 "eval.sweep_steps=[1,2]", "eval.sweep_shifts=[1.0]")
    assert result.exit_code == 0, result.output
    assert "| teacher | heun | 2 | 3 | 1 |" in result.output
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_demo_end_to_end_writes_report(tmp_path, monkeypatch):
    """pretrain + distill + eval through the demo command, tiny and fast (a user's .npz has no bundled teacher)."""
    monkeypatch.setenv("SHORTCUTFM_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    data = _npz(tmp_path / "ring.npz", x=rng.normal(size=(600, 2)).astype(np.float32))
    out = tmp_path / "demo"
    result = run(
        "demo", "--data", data, "--out", out, "--teacher-steps", 10,
        "train.steps=6", "eval.every=3", "eval.num_samples=200", "eval.sweep_samples=300",
        "eval.sweep_steps=[1,3,32]", "jumps.self_grids=[2,4]", "jumps.teacher_grid=8",
    )
    assert result.exit_code == 0, result.output
    report = out / "report"
    import json

    rows = json.loads((report / "metrics.json").read_text())["rows"]
    assert {"model", "sampler", "steps", "nfe", "metric", "value"} <= set(rows[0])
    combos = {(r["model"], r["sampler"], r["steps"]) for r in rows}
    assert ("student", "euler", 3) in combos and ("teacher", "heun", 32) in combos and ("data", "-", 0) in combos
    heun = [r for r in rows if r["sampler"] == "heun" and r["steps"] == 3]
    assert all(r["nfe"] == 5 for r in heun)
    assert {r["metric"] for r in rows} == {"energy_distance", "sliced_wasserstein2"}
    for name in ("report.md", "energy_distance_vs_steps.png", "sliced_wasserstein2_vs_steps.png", "samples.png", "config.yaml"):
        assert (report / name).is_file(), name
    assert "| student | euler | 3 |" in result.output

    # a second demo distils the first one's teacher (--teacher) instead of training another
    again = run("demo", "--data", data, "--out", tmp_path / "again", "--teacher", out / "teacher" / "model",
                "train.steps=3", "eval.every=0", "eval.sweep_samples=300", "eval.sweep_steps=[1]",
                "eval.sweep_shifts=[1.0]", "calibration.steps=[]", "jumps.self_grids=[2,4]", "jumps.teacher_grid=8")
    assert again.exit_code == 0, again.output
    assert not (tmp_path / "again" / "teacher").exists()
    student_config = (tmp_path / "again" / "student" / "config.yaml").read_text()
    assert f"teacher: {out / 'teacher' / 'model'}" in student_config
