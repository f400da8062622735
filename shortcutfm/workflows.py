"""End-to-end workflows the CLI calls: train, evaluate (step sweep + report), demo."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, load_config, save_config
from .evaluation.judge import Judge, SampleSet
from .evaluation.report import markdown_table, plot_metric_vs_steps, plot_samples, write_metrics
from .evaluation.sweep import MetricRow, floor_rows, step_sweep
from .models.builtin import load_model
from .training.builtin import builtin_setup, calibrate_model, deployed_velocity, load_split
from .training.trainer import TrainResult, train


def cache_dir() -> Path:
    """Where derived artefacts (evaluation classifiers) are cached: ``$SHORTCUTFM_CACHE`` or ~/.cache/shortcutfm."""
    return Path(os.environ.get("SHORTCUTFM_CACHE", Path.home() / ".cache" / "shortcutfm"))


def is_diffusers_family(kind: str) -> bool:
    return kind not in ("auto", "mlp", "convnet")


def run_training(config: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train with ``config``: built-in networks on array data, or a LoRA on a diffusers model.

    ``resume`` continues the run in ``train.output_dir``; ``overwrite`` replaces another run there (without either,
    a folder holding another run is refused)."""
    # initialisation of a from-scratch network, or of a diffusers student's LoRA A matrices (peft draws them from
    # the global generator): the same config gives the same run, also after other runs in the same process
    torch.manual_seed(config.train.seed)
    if is_diffusers_family(config.model.kind):
        try:
            from .training.diffusers_setup import diffusers_setup
        except ImportError as exc:
            raise ValueError(f"model.kind={config.model.kind!r} needs the diffusers extra ({exc.name} is missing): "
                             'pip install "shortcutfm[diffusers]"') from None

        setup = diffusers_setup(config)
        if config.train.mode == "distill" and config.eval.every:
            from .t2i.evaluate import is_world_pipeline, selection_evaluator

            if is_world_pipeline(config.model.pretrained):  # the proving ground: select on images, not latents
                setup.evaluate = selection_evaluator(config, setup.student, setup.data.cache, cache_dir() / "t2i")
        result = train(config, setup, resume=resume, overwrite=overwrite, progress=progress)
        from .training.validation import calibrate_lora

        calibration = calibrate_lora(config, setup.student, setup.data.cache, result.model_dir)
        if calibration is not None and progress:
            print(f"calibrated LoRA scales per step count: {_scales_text(calibration)}")
        if config.train.mode == "distill" and int(os.environ.get("RANK", "0")) == 0:
            from .model_card import write_model_card

            write_model_card(result.model_dir, config, result.state)
        return result
    split = load_split(config)
    judge = None
    if config.train.mode == "distill" and config.eval.every:
        judge = Judge.for_data(split.train, split.holdout, cache_dir() / "classifiers", seed=config.eval.seed)
    result = train(config, builtin_setup(config, split, judge), resume=resume, overwrite=overwrite, progress=progress)
    calibration = None
    if config.train.mode == "distill" and config.calibration.steps:
        judge = judge or Judge.for_data(split.train, split.holdout, cache_dir() / "classifiers", seed=config.eval.seed)
        calibration = calibrate_model(config, result.model_dir, judge, split.train)
    if calibration is not None and progress:
        print(f"calibrated scales per step count: {_scales_text(calibration)}")
    return result


def _scales_text(calibration) -> str:
    return ", ".join(f"{n}: {a:g}" for n, a in calibration.scales.items()) + " (1 = the student as trained, 0 = the teacher)"


@dataclass
class EvaluationReport:
    rows: list[MetricRow]
    out_dir: Path
    markdown: str


def evaluate_models(
    config: Config,
    teacher_dir: Path,
    student_dir: Path | None,
    out_dir: Path,
    *,
    title: str = "shortcutfm step sweep",
    notes: list[str] | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Step sweep of the teacher (Euler, Heun) and the student (Euler) with the same noise; writes the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    split = load_split(config)
    judge = Judge.for_data(split.train, split.holdout, cache_dir() / "classifiers", seed=config.eval.seed)
    samples = SampleSet.draw(split.holdout, config.eval.sweep_samples, config.eval.seed)
    models = {"teacher": (deployed_velocity(load_model(teacher_dir)), ("euler", "heun"))}
    if student_dir is not None:
        student = load_model(student_dir)
        models["student"] = (deployed_velocity(student), ("euler",))
        if student.calibration is not None:  # the same student sampled as trained (scale 1), for comparison
            models["student-uncalibrated"] = (models["student"][0].plain, ("euler",))
    steps, shifts = config.eval.sweep_steps, config.eval.sweep_shifts
    first_shift = shifts[0]
    keep = {("teacher", "euler", max(steps), first_shift), ("teacher", "euler", 3, first_shift)}
    if student_dir is not None:
        keep |= {("student", "euler", n, first_shift) for n in (1, 3) if n in steps}
    started = time.perf_counter()
    rows, kept = step_sweep(models, judge, samples, steps, shifts, keep=keep, progress=progress)
    rows = floor_rows(judge, split.train) + rows
    figures = plot_metric_vs_steps(rows, out_dir) + [plot_samples(kept, split.holdout, out_dir)]
    extra = {"classifier_test_accuracy": judge.classifier_accuracy, "data": split.train.name}
    write_metrics(rows, out_dir / "metrics.json", extra)
    metrics = list(dict.fromkeys(r.metric for r in rows))
    table = markdown_table(rows, metrics)
    lines = [f"# {title}", "", f"Data: `{split.train.name}` ({len(split.train)} training / {len(split.holdout)} held-out "
             f"samples of shape {split.train.sample_shape}). Every row uses the same {config.eval.sweep_samples} noise samples.",
             ""]
    if judge.classifier_accuracy is not None:
        lines.append(f"Feature classifier test accuracy: {judge.classifier_accuracy:.3f} (Frechet distance in its penultimate features).")
        lines.append("")
    lines += list(notes or []) + ["", table, ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", f"Sweep time: {time.perf_counter() - started:.0f} s."]
    markdown = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(markdown)
    return EvaluationReport(rows=rows, out_dir=out_dir, markdown=table)


def calibrate_run(run_dir: Path, overrides: list[str] | None = None):
    """Calibrate (or re-calibrate) the distilled built-in student of a finished run, with the run's own config
    (``config.yaml``) and ``overrides`` (e.g. ``calibration.steps=[1,2,4]``); returns the
    :class:`~shortcutfm.core.calibration.StepCalibration` written beside ``run_dir/model``."""
    run_dir = Path(run_dir)
    config_path, model_dir = run_dir / "config.yaml", run_dir / "model"
    if not config_path.is_file() or not model_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a finished training run (needs config.yaml and model/)")
    config = load_config(config_path, list(overrides or []))
    if is_diffusers_family(config.model.kind):
        raise ValueError(f"{run_dir} is a LoRA run: calibration is for built-in networks")
    split = load_split(config)
    judge = Judge.for_data(split.train, split.holdout, cache_dir() / "classifiers", seed=config.eval.seed)
    calibration = calibrate_model(config, model_dir, judge, split.train)
    if calibration is None:
        raise ValueError(f"{run_dir}: nothing to calibrate (train.mode={config.train.mode}, "
                         f"calibration.steps={list(config.calibration.steps)}, "
                         f"model.fold_guidance={config.model.fold_guidance})")
    return calibration


# ---------------------------------------------------------------- presets and the demo

PRESETS_DIR = Path(__file__).parent / "configs"
TEACHERS_DIR = Path(__file__).parent / "assets" / "teachers"


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or the name of a packaged preset (``pretrain``, ``distill``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a preset; presets: {', '.join(names)}")


def bundled_teacher(source: str) -> Path | None:
    """The packaged teacher for a built-in data set, if there is one (see README for how it was made)."""
    directory = TEACHERS_DIR / source
    return directory if (directory / "model.json").is_file() else None


@dataclass
class DemoResult:
    teacher_dir: Path
    student_dir: Path
    report: EvaluationReport


def run_demo(
    source: str,
    out_dir: Path,
    overrides: list[str] | None = None,
    *,
    teacher_steps: int = 8000,
    teacher: Path | None = None,
    sweep_threads: int | None = None,
    progress: bool = True,
) -> DemoResult:
    """Teacher (``teacher``, else the bundled one, else ``teacher_steps`` of flow matching here), SCFM student,
    step sweep and report."""

    out_dir = Path(out_dir)
    overrides = list(overrides or [])
    teacher_dir = Path(teacher) if teacher is not None else bundled_teacher(source)
    notes = []
    if teacher is not None:
        notes.append(f"Teacher: `{teacher_dir}`, given with --teacher.")
    elif teacher_dir is None:
        teacher_config = load_config(
            resolve_config_path("pretrain"),
            [f"data.source={source}", f"train.output_dir={out_dir / 'teacher'}", f"train.steps={teacher_steps}"],
        )
        print(f"No bundled teacher for {source!r}: training one ({teacher_config.train.steps} steps).")
        teacher_dir = run_training(teacher_config, overwrite=True, progress=progress).model_dir  # the demo's own folder
        notes.append(f"Teacher trained here: {teacher_config.train.steps} flow-matching steps.")
    else:
        notes.append(f"Teacher: the bundled checkpoint `{teacher_dir.name}` (reproduce it with the command in README).")
    config = load_config(
        resolve_config_path("distill"),
        [f"data.source={source}", f"train.teacher={teacher_dir}", f"train.output_dir={out_dir / 'student'}"] + overrides,
    )
    print(f"Distilling with SCFM: {config.train.steps} steps, evaluating {config.eval.select_steps}-step quality every "
          f"{config.eval.every} steps.")
    result = run_training(config, overwrite=True, progress=progress)  # a rerun of the demo replaces its student
    best = result.state
    if best.best_step is not None:
        notes.append(f"Student: SCFM, best of {len(best.history)} evaluations ({best.selection_metric}) at step "
                     f"{best.best_step} of {best.step}.")
    if sweep_threads:
        torch.set_num_threads(sweep_threads)  # large sampling batches use every core; training used one
    report = evaluate_models(
        config, teacher_dir, result.model_dir, out_dir / "report", title=f"SCFM demo on {source}", notes=notes,
        progress=progress,
    )
    return DemoResult(teacher_dir=teacher_dir, student_dir=result.model_dir, report=report)
