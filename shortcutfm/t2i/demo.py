"""``shortcutfm demo --data t2i``: the text-to-image proving ground, through the same functions a FLUX user runs.

bundled world pipeline (the teacher) -> ``prepare --prompts`` (32-step teacher samples of training prompts)
-> ``train`` with the ``t2i`` preset (the sd3 recipe scaled to this model: an SCFM LoRA with guided velocities)
-> step sweep on held-out prompts (student Euler 1-16; teacher Euler 3, 8, 32 and Heun at 2-4 steps; the same
noise for all) -> ``report.md``, ``metrics.json``, ``config.yaml`` and figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, load_config, save_config
from ..evaluation.report import markdown_table, plot_metric_vs_steps, write_metrics
from ..evaluation.sweep import MetricRow
from . import evaluate as ev
from .pipeline import T5_LENGTH

STUDENT_STEPS = (1, 2, 3, 4, 8, 16)
TEACHER_EULER_STEPS = (3, 8, 32)
TEACHER_HEUN_STEPS = (2, 3, 4)  # 3, 5 and 7 evaluations: matched to the student's 3-8 passes
GRID_STEPS = (1, 3, 32)
VALIDATION_PROMPTS = 4


@dataclass
class T2IReport:
    rows: list[MetricRow]
    out_dir: Path
    markdown: str


def sweep_plan(student: bool = True) -> dict[str, tuple[tuple[str, int], ...]]:
    plan = {"teacher": tuple(("euler", n) for n in TEACHER_EULER_STEPS) + tuple(("heun", n) for n in TEACHER_HEUN_STEPS)}
    if student:
        plan["student"] = tuple(("euler", n) for n in STUDENT_STEPS)
    return plan


def evaluate_lora_run(pipeline_dir: Path, lora_dir: Path | None, out_dir: Path, *, guidance_scale: float,
                      shift: float, num_prompts: int = 512, seed: int = 1234, lora_scale: float | None = None,
                      student_guidance_scale: float | None = None, student_name: str = "student",
                      cache_dir: Path, title: str = "t2i proving ground: step sweep", notes: list[str] | None = None,
                      extra_models: dict | None = None, progress: bool = True) -> T2IReport:
    """The step sweep of the world pipeline's teacher (and of a LoRA student) on ``num_prompts`` held-out
    prompts; writes ``report.md``, ``metrics.json`` and figures into ``out_dir``.

    ``extra_models``: name -> (transformer, ((sampler, steps), ...)) swept too (benchmarks use it).
    ``student_guidance_scale``: the student's CFG weight (None: ``guidance_scale``; 0 for a student with the
    guidance folded in, one pass per step), reported as ``student_name``. ``lora_scale``: one scale for every step
    count, or None: each step count's calibrated scale (the LoRA's calibration.json; 1 if it has none)."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = ev.load_world_pipeline(pipeline_dir)
    judge_model, accuracy = ev.world_judge(cache_dir, progress=progress)
    prompts = ev.prompt_set(pipe, ev.held_out_prompts(num_prompts, seed), seed, T5_LENGTH)
    student_w = guidance_scale if student_guidance_scale is None else student_guidance_scale
    passes = {"teacher": 2 if guidance_scale else 1, student_name: 2 if student_w else 1}
    plan = sweep_plan(student=lora_dir is not None)
    velocities = {"teacher": (ev.guided_velocity(pipe.transformer, prompts.uncond, guidance_scale), plan["teacher"])}
    calibration = None
    if lora_dir is not None:
        student, calibration = ev.lora_velocity(pipeline_dir, lora_dir, prompts.uncond, student_w, lora_scale)
        velocities[student_name] = (student, plan["student"])
    for name, (transformer, model_plan) in (extra_models or {}).items():
        velocities[name] = (ev.guided_velocity(transformer, prompts.uncond, guidance_scale), model_plan)
        passes[name] = passes["teacher"]
    rows, images = ev.world_sweep(pipe, velocities, prompts, judge_model, shift=shift, passes_per_evaluation=passes,
                                  progress=progress)
    rows = ev.floor_rows(judge_model, prompts) + rows
    figures = plot_metric_vs_steps(rows, out_dir)
    figures.append(plot_prompt_grid(images, prompts, out_dir / "samples.png"))
    write_metrics(rows, out_dir / "metrics.json", {"judge_held_out_accuracy": accuracy, "num_prompts": num_prompts,
                                                   "guidance_scale": guidance_scale, "shift": shift,
                                                   "lora_scale": lora_scale,
                                                   "calibration": calibration.scales if calibration else None})
    table = markdown_table(rows, ["fd_data", "fd_teacher", "adherence"])
    lines = [f"# {title}", "",
             f"{num_prompts} held-out prompts (scenes training never saw), the same noise for every row; CFG scale "
             f"w = {guidance_scale:g} (NFE counts both passes), grid shift {shift:g}.", "",
             "Judge accuracy on held-out renders: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()) + ".", ""]
    lines += list(notes or []) + ["", table, ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", f"Sweep time: {time.perf_counter() - started:.0f} s."]
    markdown = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(markdown)
    return T2IReport(rows, out_dir, table)


def plot_prompt_grid(images: dict, prompts: ev.PromptSet, path: Path, count: int = 8) -> Path:
    """The first ``count`` prompts (rows): a real render, then the teacher and the student at 1, 3 and 32 steps."""
    from ..evaluation.report import plt  # Agg backend selected there

    columns = [("real render", prompts.reference)]
    for name in dict.fromkeys(key[0] for key in images):  # teacher first, then each student
        for steps in GRID_STEPS:
            if (name, "euler", steps) in images:
                columns.append((f"{name} {steps}", images[(name, "euler", steps)]))
    fig, axes = plt.subplots(count, len(columns), figsize=(1.3 * len(columns) + 4.2, 1.3 * count), squeeze=False)
    for row in range(count):
        for col, (title, batch) in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(((batch[row].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row][-1].text(1.08, 0.5, prompts.prompts[row], transform=axes[row][-1].transAxes, fontsize=6.5,
                           va="center", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def demo_config(out_dir: Path, pipeline_dir: Path, overrides: list[str]) -> Config:
    from ..workflows import resolve_config_path

    return load_config(resolve_config_path("t2i"), [
        f"data.source={out_dir / 'cache'}", f"model.pretrained={pipeline_dir}",
        f"train.output_dir={out_dir / 'student'}", *overrides,
    ])


def prepare_teacher_data(pipeline_dir: Path, prompt_file: Path, cache: Path, guidance_scale: float,
                         progress: bool = True):
    """``shortcutfm prepare --prompts``: 32-step teacher samples of the prompts, cached with their embeddings."""
    from ..preparation import prepare_from_prompts

    pipe = ev.load_world_pipeline(pipeline_dir)
    return prepare_from_prompts(pipe, prompt_file, cache, num_steps=32, guidance_scale=guidance_scale + 1.0,
                                max_sequence_length=T5_LENGTH, model_id=str(pipeline_dir), batch_size=64,
                                show_progress=progress)


def run_t2i_demo(out_dir: Path, overrides: list[str] | None = None, *, num_train_prompts: int = 512,
                 num_eval_prompts: int = 512, pipeline_dir: Path = ev.BUNDLED_PIPELINE, cache_dir: Path,
                 sweep_threads: int | None = None, progress: bool = True) -> T2IReport:
    from ..workflows import run_training

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if sweep_threads:  # unlike the small built-in networks, this transformer trains faster on every core
        torch.set_num_threads(sweep_threads)
    if not ev.is_world_pipeline(pipeline_dir):
        raise FileNotFoundError(f"{pipeline_dir} is not a t2i world pipeline (no {ev.MARKER}); see docs/proving_ground.md")
    validation_file = out_dir / "validation_prompts.txt"  # validation grids: a few training prompts (never held-out ones)
    config = demo_config(out_dir, pipeline_dir, [f"validation.prompt_file={validation_file}", *(overrides or [])])
    prompt_file = out_dir / "train_prompts.txt"
    train_prompts = ev.training_prompts(num_train_prompts, config.train.seed)
    prompt_file.write_text("\n".join(train_prompts) + "\n")
    validation_file.write_text("\n".join(train_prompts[:VALIDATION_PROMPTS]) + "\n")
    print(f"Teacher-made data: {num_train_prompts} training prompts, 32 Euler steps each (prepare --prompts).")
    prepare_teacher_data(pipeline_dir, prompt_file, out_dir / "cache", ev.training_guidance_scale(config), progress)
    prepared = time.perf_counter() - started
    print(f"SCFM LoRA: {config.train.steps} steps (batch {config.train.batch_size}), selecting on "
          f"{config.eval.select_steps}-step fd_teacher every {config.eval.every} steps.")
    result = run_training(config, overwrite=True, progress=progress)  # a rerun of the demo replaces its student
    trained = time.perf_counter() - started - prepared
    state = result.state
    notes = [f"Teacher: the bundled world pipeline `{pipeline_dir.name}`; training data: {num_train_prompts} "
             f"32-step teacher samples of training prompts ({prepared:.0f} s).",
             f"Student: SCFM LoRA rank {config.lora.rank}, {state.step} steps in {trained:.0f} s"
             + (f", best {state.selection_metric} at step {state.best_step}." if state.best_step else ".")]
    folded = {"student_guidance_scale": 0.0, "student_name": "student-1pass"} if config.model.fold_guidance else {}
    report = evaluate_lora_run(pipeline_dir, result.model_dir, out_dir / "report", **folded,
                               guidance_scale=ev.training_guidance_scale(config), shift=config.eval.select_shift,
                               num_prompts=num_eval_prompts, seed=config.eval.seed, cache_dir=cache_dir,
                               title="SCFM demo on the t2i proving ground", notes=notes, progress=progress)
    save_config(config, out_dir / "report" / "config.yaml")
    total = time.perf_counter() - started
    with open(out_dir / "report" / "report.md", "a") as handle:
        handle.write(f"Demo wall time: {total:.0f} s.\n")
    return report

