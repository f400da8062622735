"""Every claim of the paper, measured on the t2i proving ground, through the commands' own library functions.

    python benchmarks/t2i_claims.py --out runs/claims                 # about an hour on a 2-core CPU
    python benchmarks/t2i_claims.py --out runs/claims --demo-run runs/t2i-demo   # reuse the demo as `full`
    python benchmarks/t2i_claims.py --out runs/claims --quick         # a tiny pipeline, a minute (the tests)

Writes ``DIR/metrics.json``: rows ``experiment``, ``model``, ``sampler``, ``steps``, ``nfe``, ``shift``,
``metric``, ``value``, all on held-out prompts, plus ``DIR/report.md`` and ``DIR/config.json`` (the settings):

* ``full``: the demo's student (``prepare --prompts`` on training prompts, ``train`` with the t2i preset);
* ``fewshot-10`` / ``fewshot-1``: the same recipe from 10 / 1 real world renders (``prepare --images``);
* ``data-10`` / ``data-100`` / ``data-1000``: from that many teacher-made samples;
* ``pretrain``: the teacher's transformer trained from scratch on the teacher's real-image cache for the same
  optimiser steps with plain flow matching (``pretrain-fm``) and with SCFM rows mixed in (``pretrain-scfm``,
  ``jumps.flow_fraction`` < 1), swept at 1-32 steps, with ``seconds_per_step`` rows;
* ``style``: an ordinary LoRA (plain flow matching, unguided) trained on the teacher for a fixed white background
  whatever the caption says, loaded with the ``full`` SCFM LoRA in the stock ``StableDiffusion3Pipeline``
  (``set_adapters``); ``style_rate`` (the share of images whose border is white) of ``student+style`` at 3 steps
  and ``teacher+style`` at 32, on held-out prompts that ask for another background (so without the LoRA it is 0).

Trainings run two at a time in separate processes (one torch thread each); the sweep samples every model with
the same noise in one pass.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

# The style LoRA's background. It must be one the world's VAE can draw: the VAE was trained on grey backgrounds
# only and decodes a purple one (tried first) as mid-grey, so no LoRA on the transformer could show it.
STYLE_BACKGROUND = "white"
STYLE_TOLERANCE = 0.15


@dataclass
class ClaimSettings:
    """The budget of one claims run (``quick`` shrinks everything for the tests)."""

    pipeline: str = ""  # the teacher pipeline folder ("" = the bundled one)
    teacher_cache: str = ""  # the real-image cache the teacher was trained on (pretrain experiment)
    pretrain_base: str = ""  # the pipeline whose transformer architecture `pretrain` trains ("" = the teacher's)
    train_prompts: int = 512
    eval_prompts: int = 512
    student_steps: int = 1000  # the t2i preset's (the demo's)
    pretrain_steps: int = 3000
    pretrain_batch: int = 32
    pretrain_flow_fraction: float = 0.75
    style_images: int = 256
    style_steps: int = 400
    fewshot: tuple[int, ...] = (10, 1)
    data_sizes: tuple[int, ...] = (10, 100, 1000)
    workers: int = 2
    overrides: list[str] = field(default_factory=list)  # applied to every student run (quick mode)
    pretrain_overrides: list[str] = field(default_factory=list)
    student_sweep: tuple[int, ...] = (1, 2, 3, 4, 8, 16)
    pretrain_sweep: tuple[int, ...] = (1, 2, 3, 4, 8, 16, 32)
    seed: int = 0


def quick_settings(pipeline: Path, teacher_cache: Path) -> ClaimSettings:
    return ClaimSettings(
        pipeline=str(pipeline), teacher_cache=str(teacher_cache), train_prompts=8, eval_prompts=24,
        student_steps=4, pretrain_steps=4, pretrain_batch=4, style_images=8, style_steps=3, fewshot=(2, 1),
        data_sizes=(2, 4), workers=1, student_sweep=(1, 3), pretrain_sweep=(1, 3, 32),
        overrides=["train.batch_size=4", "eval.every=2", "eval.num_samples=4", "train.checkpoint_every=0"],
        pretrain_overrides=["train.checkpoint_every=0", "optim.warmup_steps=1"],
    )


# ---------------------------------------------------------------- one training each (run in worker processes)

RESULT_NAME = "claim_result.json"


def reusing_finished(function):
    """Run a training job unless its folder already holds the result of the same job (a rerun, or trainings
    made earlier with ``--only``): the job description is stored beside the result and must match."""

    @functools.wraps(function)  # keeps the module-level name, so worker processes can unpickle the job function
    def run(job: dict) -> dict:
        path = Path(job["out"]) / RESULT_NAME
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("job") == job:
                return stored["result"]
            # a finished job of another description (an older recipe): its checkpoints must not be resumed
            shutil.rmtree(job["out"])
        result = function(job)
        path.write_text(json.dumps({"job": job, "result": result}, indent=2))
        return result

    return run


@reusing_finished
def _student_job(job: dict) -> dict:
    """Prepare the job's data (teacher-made prompts or images) and train an SCFM LoRA; returns its run."""
    torch.set_num_threads(1)
    from shortcutfm.preparation import prepare_from_folder
    from shortcutfm.t2i import world
    from shortcutfm.t2i.demo import demo_config, prepare_teacher_data
    from shortcutfm.t2i.evaluate import load_world_pipeline, training_guidance_scale, training_prompts
    from shortcutfm.t2i.pipeline import T5_LENGTH
    from shortcutfm.workflows import run_training

    out, pipeline = Path(job["out"]), Path(job["pipeline"])
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(out, pipeline, job["overrides"])
    if job["kind"] == "prompts":
        prompt_file = out / "train_prompts.txt"
        prompt_file.write_text("\n".join(training_prompts(job["count"], job["seed"])) + "\n")
        prepare_teacher_data(pipeline, prompt_file, out / "cache", training_guidance_scale(config), progress=False)
    else:  # real renders of training scenes, images the teacher did not make
        folder = out / "images"
        world.write_image_folder(folder, world.random_scenes(job["count"], job["seed"] + 777, "train"), job["seed"] + 778)
        prepare_from_folder(load_world_pipeline(pipeline), folder, out / "cache", max_sequence_length=T5_LENGTH,
                            model_id=str(pipeline), show_progress=False)
    started = time.perf_counter()
    result = run_training(config, resume=True, progress=False)  # a killed claims run continues where it stopped
    return {"name": job["name"], "model_dir": str(result.model_dir), "seconds": time.perf_counter() - started,
            "steps": result.state.step, "best_step": result.state.best_step}


@reusing_finished
def _pretrain_job(job: dict) -> dict:
    """Train the teacher's architecture from scratch on the real-image cache (plain FM or FM + SCFM rows)."""
    torch.set_num_threads(1)
    from shortcutfm.config import load_config
    from shortcutfm.workflows import resolve_config_path, run_training

    config = load_config(resolve_config_path("t2i-teacher"), [
        f"data.source={job['cache']}", f"model.pretrained={job['pipeline']}", f"train.output_dir={job['out']}",
        f"train.steps={job['steps']}", f"train.batch_size={job['batch']}", f"jumps.flow_fraction={job['flow_fraction']}",
        *job["overrides"],
    ])
    first_step = _resumed_step(Path(job["out"]))
    started = time.perf_counter()
    result = run_training(config, resume=True, progress=False)  # a killed claims run continues where it stopped
    seconds = time.perf_counter() - started
    timed = max(1, result.state.step - first_step)  # the steps this process ran (the rest ran before a kill)
    return {"name": job["name"], "model_dir": str(result.model_dir), "seconds": seconds,
            "seconds_per_step": seconds / timed, "timed_steps": timed, "steps": result.state.step}


def _resumed_step(run_dir: Path) -> int:
    from shortcutfm.training.checkpoint import latest_checkpoint

    found = latest_checkpoint(run_dir)
    return int(found.name.split("-")[-1]) if found is not None else 0


@reusing_finished
def _style_job(job: dict) -> dict:
    """An ordinary LoRA: plain flow matching (flow_fraction 1, unguided) on renders with the style background."""
    torch.set_num_threads(1)
    from shortcutfm.preparation import prepare_from_folder
    from shortcutfm.t2i.demo import demo_config
    from shortcutfm.t2i.evaluate import load_world_pipeline
    from shortcutfm.t2i.pipeline import T5_LENGTH
    from shortcutfm.workflows import run_training

    out, pipeline = Path(job["out"]), Path(job["pipeline"])
    folder = out / "images"
    write_style_folder(folder, job["count"], job["seed"])
    prepare_from_folder(load_world_pipeline(pipeline), folder, out / "cache", max_sequence_length=T5_LENGTH,
                        model_id=str(pipeline), show_progress=False)
    config = demo_config(out, pipeline, [
        "jumps.flow_fraction=1.0", "model.guidance_scale=0.0", "eval.every=0", f"train.steps={job['steps']}",
        "jumps.shift_range=[1.0, 3.0]", "jumps.alt_shift_prob=0.0",
        "calibration.steps=[]",  # an ordinary LoRA, loaded at weight 1: no step-count scales to find
        *job["overrides"],
    ])
    result = run_training(config, resume=True, progress=False)  # a killed claims run continues where it stopped
    return {"name": job["name"], "model_dir": str(result.model_dir)}


def write_style_folder(folder: Path, count: int, seed: int) -> None:
    """World renders whose background is always :data:`STYLE_BACKGROUND`, captioned as drawn before the change (so
    the caption may ask for another background: the style overrides it, and is not in words)."""
    from PIL import Image

    from shortcutfm.t2i import world

    folder.mkdir(parents=True, exist_ok=True)
    scenes = world.random_scenes(count, seed + 991, "train")
    images = world.render_many(scenes, seed + 992)
    texts = world.captions_for(scenes, seed + 993)
    colour = np.array(style_colour(), dtype=np.float32)[:, None, None]
    for index, (scene, image, text) in enumerate(zip(scenes, images, texts)):
        background = np.array(world.BACKGROUNDS[scene.background], dtype=np.float32)[:, None, None]
        is_background = np.abs(image - background).max(axis=0) < 1e-4
        image = np.where(is_background[None], colour, image)
        Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / f"{index:06d}.png")
        (folder / f"{index:06d}.txt").write_text(text + "\n")


def style_colour() -> tuple[float, float, float]:
    from shortcutfm.t2i import world

    return world.BACKGROUNDS[STYLE_BACKGROUND]


def style_prompts(count: int, seed: int) -> list[str]:
    """Held-out captions that ask for a background other than the style's, so that only the LoRA can make it."""
    from shortcutfm.t2i import world

    scenes = [s for s in world.random_scenes(count, seed, split="heldout") if s.background != STYLE_BACKGROUND]
    return world.captions_for(scenes, seed + 1)


def style_rate(images: np.ndarray) -> float:
    """Share of (N, H, W, 3) uint8 images showing the style: at least half of the pixels of their outer 2-pixel
    ring within tolerance of the style colour (an object may cover a corner, never half the ring)."""
    pixels = images.astype(np.float32) / 255
    ring = np.ones(pixels.shape[1:3], dtype=bool)
    ring[2:-2, 2:-2] = False
    close = np.abs(pixels[:, ring] - np.array(style_colour())).max(axis=-1) < STYLE_TOLERANCE
    return float(np.mean(close.mean(axis=1) >= 0.5))


# ---------------------------------------------------------------- measuring


def _rows(rows, experiment: str, model: str | None = None) -> list[dict]:
    out = []
    for row in rows:
        entry = {"experiment": experiment, **row.to_dict()}
        if model is not None:
            entry["model"] = model
        out.append(entry)
    return out


def measure_style(pipeline: Path, scfm_lora: Path, style_lora: Path, prompts: list[str], guidance_scale: float,
                  shift: float, seed: int) -> list[dict]:
    """style_rate with the stock pipeline: SCFM + style LoRA at 3 steps, style LoRA alone at 32, and without style."""
    from shortcutfm.models.diffusers import sample_with_pipeline
    from shortcutfm.t2i.evaluate import load_world_pipeline

    pipe = load_world_pipeline(pipeline)
    pipe.load_lora_weights(str(scfm_lora), adapter_name="scfm")
    pipe.load_lora_weights(str(style_lora), adapter_name="style")
    plans = [("student+style", ["scfm", "style"], 3), ("teacher+style", ["style"], 32),
             ("student", ["scfm"], 3), ("teacher", [], 32)]
    rows = []
    for model, adapters, steps in plans:
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters(adapters, adapter_weights=[1.0] * len(adapters))
        else:
            pipe.disable_lora()
        images = sample_with_pipeline(pipe, prompts, num_steps=steps, shift=shift, guidance=guidance_scale,
                                      generator=torch.Generator().manual_seed(seed), height=32, width=32,
                                      output_type="np", max_sequence_length=4)
        images = (np.asarray(images) * 255).round().astype(np.uint8)
        passes = 2 if guidance_scale else 1
        rows.append({"experiment": "style", "model": model, "sampler": "euler", "steps": steps, "nfe": steps * passes,
                     "shift": shift, "metric": "style_rate", "value": style_rate(images)})
    return rows


def run_claims(out: Path, settings: ClaimSettings, *, demo_run: Path | None = None, only: list[str] | None = None,
               progress: bool = True) -> dict | None:
    """Train every experiment's models (two at a time), then sweep them all; ``only`` trains just the named jobs
    (e.g. ``pretrain-fm``) and stops, so that a later full run reuses them."""
    from shortcutfm.config import load_config
    from shortcutfm.t2i import evaluate as ev
    from shortcutfm.t2i.demo import sweep_plan
    from shortcutfm.t2i.pipeline import T5_LENGTH
    from shortcutfm.workflows import cache_dir, resolve_config_path

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Path(settings.pipeline) if settings.pipeline else ev.BUNDLED_PIPELINE
    preset = load_config(resolve_config_path("t2i"), settings.overrides)
    (out / "config.json").write_text(json.dumps({**asdict(settings), "pipeline": str(pipeline),
                                                 "demo_run": str(demo_run) if demo_run else None}, indent=2))

    # The preset's resolved values are part of every job, so a finished job is reused only while the recipe it was
    # trained with is still the preset's (a changed learning rate retrains it).
    recipe = hashlib.sha256(json.dumps(asdict(preset), default=str, sort_keys=True).encode()).hexdigest()[:16]

    def student(name, kind, count):
        return {"name": name, "kind": kind, "count": count, "out": str(out / name), "pipeline": str(pipeline),
                "seed": settings.seed, "overrides": [f"train.steps={settings.student_steps}", *settings.overrides],
                "recipe": recipe}

    jobs = []
    if demo_run is None:
        jobs.append((_student_job, student("full", "prompts", settings.train_prompts)))
    jobs += [(_student_job, student(f"fewshot-{k}", "images", k)) for k in settings.fewshot]
    jobs += [(_student_job, student(f"data-{k}", "prompts", k)) for k in settings.data_sizes]
    if settings.teacher_cache:
        for name, fraction in (("pretrain-fm", 1.0), ("pretrain-scfm", settings.pretrain_flow_fraction)):
            base = settings.pretrain_base or str(pipeline)
            jobs.append((_pretrain_job, {"name": name, "out": str(out / name), "pipeline": base,
                                         "cache": settings.teacher_cache, "steps": settings.pretrain_steps,
                                         "batch": settings.pretrain_batch, "flow_fraction": fraction,
                                         "overrides": settings.pretrain_overrides}))
    jobs.append((_style_job, {"name": "style-lora", "out": str(out / "style-lora"), "pipeline": str(pipeline),
                              "count": settings.style_images, "steps": settings.style_steps, "seed": settings.seed,
                              "recipe": recipe,
                              "overrides": [o for o in settings.overrides if not o.startswith("eval.")]}))
    if only:
        unknown = set(only) - {job["name"] for _, job in jobs}
        if unknown:
            raise SystemExit(f"--only: unknown jobs {sorted(unknown)}; known: {[job['name'] for _, job in jobs]}")
        jobs = [(function, job) for function, job in jobs if job["name"] in only]
    results = {}
    if demo_run is not None:
        results["full"] = {"name": "full", "model_dir": str(Path(demo_run) / "student" / "model")}
    if settings.workers > 1:
        with ProcessPoolExecutor(settings.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(function, job) for function, job in jobs]
            for future in futures:
                result = future.result()
                results[result["name"]] = result
                print(f"trained {result['name']} ({result.get('seconds', 0):.0f} s)", flush=True)
    else:
        for function, job in jobs:
            result = function(job)
            results[result["name"]] = result
    trained = time.perf_counter() - started
    if only:
        return None

    # one sweep: every model, the same held-out prompts and noise
    pipe = ev.load_world_pipeline(pipeline)
    judge_model, accuracy = ev.world_judge(cache_dir() / "t2i", progress=progress)
    prompts = ev.prompt_set(pipe, ev.held_out_prompts(settings.eval_prompts, preset.eval.seed), preset.eval.seed, T5_LENGTH)
    w = ev.training_guidance_scale(preset)
    velocities = {"teacher": (ev.guided_velocity(pipe.transformer, prompts.uncond, w), sweep_plan(False)["teacher"])}
    students = ["full", *[f"fewshot-{k}" for k in settings.fewshot], *[f"data-{k}" for k in settings.data_sizes]]
    calibrations = {}
    for name in students:  # each sampled as `shortcutfm sample` samples it: at its calibrated scale per step count
        velocity, calibration = ev.lora_velocity(pipeline, Path(results[name]["model_dir"]), prompts.uncond, w)
        velocities[name] = (velocity, tuple(("euler", n) for n in settings.student_sweep))
        calibrations[name] = calibration.scales if calibration is not None else None
    pretrained = [name for name in ("pretrain-fm", "pretrain-scfm") if name in results]
    for name in pretrained:
        transformer = ev.load_world_pipeline(results[name]["model_dir"]).transformer
        velocities[name] = (ev.guided_velocity(transformer, prompts.uncond, w),
                            tuple(("euler", n) for n in settings.pretrain_sweep))
    rows, _ = ev.world_sweep(pipe, velocities, prompts, judge_model, shift=preset.eval.select_shift,
                             passes_per_evaluation=2 if w else 1, progress=progress)
    table: list[dict] = _rows(ev.floor_rows(judge_model, prompts), "full")
    for row in rows:
        if row.model == "teacher":
            table += _rows([row], "full")
        elif row.model in pretrained:
            table += _rows([row], "pretrain")
        else:
            table += _rows([row], row.model, model="student")
    for name in pretrained:
        table.append({"experiment": "pretrain", "model": name, "sampler": "-", "steps": 0, "nfe": 0, "shift": 0.0,
                      "metric": "seconds_per_step", "value": results[name]["seconds_per_step"]})
    table += measure_style(pipeline, Path(results["full"]["model_dir"]), Path(results["style-lora"]["model_dir"]),
                           style_prompts(min(settings.eval_prompts, 256), preset.eval.seed + 5), w,
                           preset.eval.select_shift, preset.eval.seed)
    payload = {"rows": table, "judge_held_out_accuracy": accuracy, "calibration": calibrations,
               "train_seconds": trained,
               "total_seconds": time.perf_counter() - started}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2))
    (out / "report.md").write_text(report_markdown(payload))
    return payload


def lookup(rows: list[dict], **match) -> float | None:
    found = [r["value"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if len(found) == 1 else None


def _scales_text(scales: dict | None) -> str:
    return ", ".join(f"{n} steps {a:g}" for n, a in scales.items()) if scales else "scale 1 (no calibration)"


def report_markdown(payload: dict) -> str:
    rows = payload["rows"]
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    lines = ["# SCFM claims on the t2i proving ground", "",
             f"Training {payload['train_seconds']:.0f} s, total {payload['total_seconds']:.0f} s. Held-out prompts only.",
             "Each student is sampled as `shortcutfm sample` samples it, at its calibrated LoRA scale per step count:",
             *[f"- {name}: {_scales_text(scales)}" for name, scales in payload.get("calibration", {}).items()], "",
             "| experiment | model | sampler | steps | NFE | fd_data | fd_teacher | adherence | other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for experiment in experiments:
        keys = list(dict.fromkeys((r["model"], r["sampler"], r["steps"], r["nfe"]) for r in rows if r["experiment"] == experiment))
        for model, sampler, steps, nfe in keys:
            values = {r["metric"]: r["value"] for r in rows if r["experiment"] == experiment and
                      (r["model"], r["sampler"], r["steps"], r["nfe"]) == (model, sampler, steps, nfe)}
            other = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k not in ("fd_data", "fd_teacher", "adherence"))
            cells = [f"{values[m]:.4g}" if m in values else "" for m in ("fd_data", "fd_teacher", "adherence")]
            lines.append(f"| {experiment} | {model} | {sampler} | {steps} | {nfe} | " + " | ".join(cells) + f" | {other} |")
    return "\n".join(lines) + "\n"


def build_quick_world(directory: Path) -> tuple[Path, Path]:
    """A tiny world pipeline (untrained VAE, 1-block transformer) with a teacher pretrained for a few steps."""
    from shortcutfm.config import load_config
    from shortcutfm.preparation import prepare_from_folder
    from shortcutfm.t2i import world
    from shortcutfm.t2i.evaluate import load_world_pipeline
    from shortcutfm.t2i.pipeline import T5_LENGTH, TransformerShape, build_base_pipeline, build_vae, save_pipeline
    from shortcutfm.workflows import resolve_config_path, run_training

    base = save_pipeline(build_base_pipeline(build_vae(0), TransformerShape(1, 2, 8)), directory / "base")
    world.write_image_folder(directory / "images", world.random_scenes(16, 0), 0)
    cache = directory / "teacher-cache"
    prepare_from_folder(load_world_pipeline(base), directory / "images", cache, max_sequence_length=T5_LENGTH,
                        model_id=str(base), show_progress=False)
    config = load_config(resolve_config_path("t2i-teacher"), [
        f"data.source={cache}", f"model.pretrained={base}", f"train.output_dir={directory / 'teacher'}",
        "train.steps=4", "train.batch_size=4", "train.checkpoint_every=0", "optim.warmup_steps=1"])
    return run_training(config, overwrite=True, progress=False).model_dir, cache  # a throwaway quick teacher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny pipeline and budgets (the test suite runs this)")
    parser.add_argument("--demo-run", type=Path, help="a `shortcutfm demo --data t2i --out DIR` folder to reuse as `full`")
    parser.add_argument("--teacher-cache", default="", help="the teacher's real-image cache (enables `pretrain`)")
    parser.add_argument("--pretrain-base", default="", help="pipeline whose architecture `pretrain` trains (default: the teacher's)")
    parser.add_argument("--pipeline", default="", help="the teacher pipeline (default: the bundled one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="train only these jobs (e.g. pretrain-fm pretrain-scfm), no sweep")
    args = parser.parse_args(argv)
    # trainings run one thread per worker process (set in each job); the sweep here uses every core
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    if args.quick:
        pipeline, cache = build_quick_world(args.out / "world")
        settings = quick_settings(pipeline, cache)
    else:
        settings = ClaimSettings(pipeline=args.pipeline, teacher_cache=args.teacher_cache,
                                 pretrain_base=args.pretrain_base, workers=args.workers)
    payload = run_claims(args.out, settings, demo_run=args.demo_run, only=args.only)
    if payload is not None:
        print(report_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
