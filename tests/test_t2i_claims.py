"""benchmarks/t2i_claims.py --quick: every experiment runs and writes the rows the issue names."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import t2i_claims  # noqa: E402

torch.set_num_threads(1)


def test_quick_claims_run_writes_every_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTCUTFM_CACHE", str(tmp_path / "cache"))
    assert t2i_claims.main(["--out", str(tmp_path / "claims"), "--quick"]) == 0
    payload = json.loads((tmp_path / "claims" / "metrics.json").read_text())
    rows = payload["rows"]
    assert {"experiment", "model", "sampler", "steps", "nfe", "metric", "value"} <= set(rows[0])
    experiments = {r["experiment"] for r in rows}
    assert experiments == {"full", "fewshot-2", "fewshot-1", "data-2", "data-4", "pretrain", "style"}
    for experiment in ("full", "fewshot-2", "fewshot-1", "data-2", "data-4"):
        assert t2i_claims.lookup(rows, experiment=experiment, model="student", steps=3, metric="fd_teacher") is not None
    for model in ("pretrain-fm", "pretrain-scfm"):
        for steps in (1, 3, 32):
            assert t2i_claims.lookup(rows, experiment="pretrain", model=model, steps=steps, metric="fd_data") is not None
        assert t2i_claims.lookup(rows, model=model, metric="seconds_per_step") > 0
    assert t2i_claims.lookup(rows, model="student+style", steps=3, metric="style_rate") is not None
    assert t2i_claims.lookup(rows, model="teacher+style", steps=32, metric="style_rate") is not None
    assert (tmp_path / "claims" / "report.md").is_file() and (tmp_path / "claims" / "config.json").is_file()


def test_style_rate_reads_the_style_colour_on_the_border():
    styled = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    styled[:] = (np.array(t2i_claims.style_colour()) * 255).round().astype(np.uint8)
    styled[1] = 128  # a gray background
    styled[2, :3, :3] = 0  # one corner covered: still styled
    styled[3, :, :16] = 0  # half the image another colour: more than half the ring is not styled
    styled[3, :2, 16:] = 0
    assert t2i_claims.style_rate(styled) == 0.5


def test_style_folder_changes_only_the_background(tmp_path):
    from PIL import Image

    from shortcutfm.t2i import world

    t2i_claims.write_style_folder(tmp_path, 3, seed=0)
    scenes = world.random_scenes(3, 991, "train")
    originals = world.render_many(scenes, 992)
    for index, original in enumerate(originals):
        styled = np.asarray(Image.open(tmp_path / f"{index:06d}.png")).astype(np.float32) / 255
        plain = original.transpose(1, 2, 0)
        corner = styled[0, 0]
        assert np.abs(corner - np.array(t2i_claims.style_colour())).max() < 0.01
        background = np.abs(plain - np.array(world.BACKGROUNDS[scenes[index].background])).max(axis=2) < 1e-4
        assert np.abs(styled[~background] - plain[~background]).max() <= 1 / 255 + 1e-6


def test_style_prompts_never_ask_for_the_style_background():
    from shortcutfm.t2i import world

    prompts = t2i_claims.style_prompts(60, seed=3)
    assert 0 < len(prompts) < 60
    assert not any(t2i_claims.STYLE_BACKGROUND in p for p in prompts)
    assert all(any(name in p for name in world.BACKGROUNDS) for p in prompts)


def test_the_bundled_vae_draws_the_style_background(tmp_path):
    """The style must survive the world VAE (a purple one came back mid-grey, so no LoRA could ever show it)."""
    from PIL import Image

    from shortcutfm.t2i.evaluate import BUNDLED_PIPELINE, load_world_pipeline

    t2i_claims.write_style_folder(tmp_path, 4, seed=1)
    images = np.stack([np.asarray(Image.open(tmp_path / f"{i:06d}.png")) for i in range(4)])
    vae = load_world_pipeline(BUNDLED_PIPELINE).vae
    with torch.no_grad():
        x = torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert t2i_claims.style_rate(images) == 1.0
    assert t2i_claims.style_rate(decoded) == 1.0


def test_a_finished_job_is_reused_only_for_the_same_recipe(tmp_path):
    seen = []

    @t2i_claims.reusing_finished
    def train(job):
        out = Path(job["out"])
        seen.append(sorted(p.name for p in out.iterdir()) if out.exists() else None)  # what a resume would find
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint").write_text(job["recipe"])
        return {"recipe": job["recipe"]}

    job = {"name": "x", "out": str(tmp_path / "x"), "recipe": "lr-1e-3"}
    assert train(job) == {"recipe": "lr-1e-3"} and seen == [None]
    assert train(dict(job)) == {"recipe": "lr-1e-3"} and len(seen) == 1  # reused, not trained again
    assert train({**job, "recipe": "lr-3e-4"}) == {"recipe": "lr-3e-4"}
    assert seen[-1] is None  # the old recipe's checkpoints were removed, not resumed
