"""Training set-up for the built-in networks (MLP, convnet) on array data: toys, digits, users' .npz files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import Config, to_dict
from ..core.grids import sigma_grid
from ..core.guidance import ClassifierFreeGuidance, null_label_uncond
from ..data import ArrayDataset, DataSplit, load_dataset
from ..evaluation.judge import Judge, SampleSet, generate
from ..core.calibration import CalibratedVelocity, StepCalibration, WeightInterpolation, calibrate
from ..models.builtin import DataInfo, LoadedModel, ModelInfo, build_model, load_model, save_calibration, save_model
from ..models.student import FullStudent, no_wrap
from .setup import Evaluation, TrainingSetup


class ArrayBatches:
    """:class:`~shortcutfm.training.setup.BatchSource` over an in-memory data set."""

    def __init__(self, data: ArrayDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond = {"y": self.data.y[indices]} if self.data.y is not None else {}
        return self.data.x[indices], cond


def guidance_wrap(num_classes: int, scale: float | None):
    """Classifier-free guidance with the null label, or no wrapper for unlabelled data / scale 0 or None."""
    if not num_classes or not scale:
        return no_wrap
    return lambda model: ClassifierFreeGuidance(model, scale, null_label_uncond(num_classes))


def deployed_velocity(loaded: LoadedModel):
    """A saved built-in model as it samples: with the guidance scale it was trained with, and, for a calibrated
    student, a :class:`~shortcutfm.core.calibration.CalibratedVelocity` (``for_steps(n)`` samples n steps at
    n's scale)."""
    model = loaded.info.model_config
    if model.fold_guidance:  # the guidance is in its weights: one plain pass
        return loaded.module
    guide = guidance_wrap(loaded.info.num_classes, model.guidance_scale)
    if loaded.calibration is not None:
        interpolation = WeightInterpolation(loaded.module, loaded.teacher_state)
        return CalibratedVelocity(interpolation.at, loaded.calibration, guide)
    return guide(loaded.module)


def calibrate_model(config: Config, model_dir: Path, judge: Judge, train: ArrayDataset) -> StepCalibration | None:
    """Calibrate the distilled student in ``model_dir`` (between it and its teacher, ``train.teacher``) per
    ``calibration.steps`` at ``eval.select_shift`` and store the result beside it; None when the config asks for
    none (``calibration.steps: []``, folded guidance, or pretraining).

    Closeness is ``judge``'s primary metric (energy distance; Frechet distance in its classifier's features for
    labelled images) to the *training* data, never the held-out split. The teacher's own samples are no reference
    here: a student better than its teacher (digits) would be pulled back towards it
    (docs/results/step_calibration_digits.md)."""
    settings = config.calibration
    if config.train.mode != "distill" or not settings.steps or config.model.fold_guidance:
        return None
    count = min(len(train), max(settings.num_samples, 2000))
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.eval.seed))[:count]
    reference = dataclasses.replace(train, x=train.x[rows], y=None, num_classes=0)
    training_judge = Judge(reference, judge.primary, judge.classifier, judge.classifier_accuracy, judge.seed)

    def distance(samples: torch.Tensor, teacher_samples: torch.Tensor) -> float:
        return training_judge.score(samples, primary_only=True)[judge.primary]

    student, teacher = load_model(model_dir), load_model(config.train.teacher)
    info = student.info
    guide = guidance_wrap(info.num_classes, info.model_config.guidance_scale)
    interpolation = WeightInterpolation(student.module, teacher.module.state_dict())
    generator = torch.Generator().manual_seed(config.eval.seed)
    noise = torch.randn((settings.num_samples, *info.sample_shape), generator=generator)
    cond = {"y": torch.arange(settings.num_samples) % info.num_classes} if info.num_classes else {}
    calibration = calibrate(lambda a: guide(interpolation.at(a)), guide(teacher.module), noise, settings.steps,
                            scales=settings.scales, shift=float(config.eval.select_shift), distance=distance,
                            metric=f"{judge.primary}_to_training_data", **cond)
    save_calibration(model_dir, calibration, teacher.module.state_dict())
    return calibration


def label_dropout(num_classes: int, probability: float):
    def training_cond(cond: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if not num_classes or probability == 0.0 or "y" not in cond:
            return cond
        drop = torch.rand(cond["y"].shape, generator=generator) < probability
        return {**cond, "y": torch.where(drop, torch.full_like(cond["y"], num_classes), cond["y"])}

    return training_cond


def load_split(config: Config) -> DataSplit:
    return load_dataset(
        config.data.source,
        holdout_fraction=config.data.holdout_fraction,
        seed=config.data.split_seed,
        num_toy_samples=config.data.num_toy_samples,
    )


def few_step_evaluator(config: Config, judge: Judge):
    """The metric that selects checkpoints: ``eval.select_steps`` Euler steps at ``eval.select_shift``."""
    samples = SampleSet.draw(judge.reference, config.eval.num_samples, config.eval.seed)
    grid = sigma_grid(config.eval.select_steps, config.eval.select_shift)

    def evaluate(velocity) -> Evaluation:
        x, _ = generate(velocity, samples, grid)
        return Evaluation(f"{judge.primary}@{config.eval.select_steps}", judge.score(x, primary_only=True)[judge.primary])

    return evaluate


def builtin_setup(config: Config, split: DataSplit, judge: Judge | None) -> TrainingSetup:
    """Model, student, data and evaluation hooks for a built-in network."""
    train = split.train
    distill = config.train.mode == "distill"
    if distill:
        if not config.train.teacher:
            raise ValueError("train.teacher must name the teacher's model directory for train.mode=distill")
        teacher = load_model(config.train.teacher)
        if tuple(teacher.info.sample_shape) != train.sample_shape or teacher.info.num_classes != train.num_classes:
            raise ValueError(
                f"teacher {config.train.teacher} was trained on samples {tuple(teacher.info.sample_shape)} with "
                f"{teacher.info.num_classes} classes, but data.source={config.data.source!r} has "
                f"{train.sample_shape} with {train.num_classes}; use the teacher's data set"
            )
        module, model_dict = teacher.module.train(), dict(teacher.info.model)
    else:
        module, model_dict = build_model(config.model, train.sample_shape, train.num_classes), to_dict(config.model)
    model_dict.update(label_dropout=config.model.label_dropout, guidance_scale=config.model.guidance_scale,
                      fold_guidance=config.model.fold_guidance)
    wrap = guidance_wrap(train.num_classes, config.model.guidance_scale)
    student = FullStudent(module, config.ema, teacher=distill, guidance=wrap, fold_guidance=config.model.fold_guidance)
    info = ModelInfo(
        model=model_dict,
        sample_shape=list(train.sample_shape),
        num_classes=train.num_classes,
        data=DataInfo(name=train.name, source=config.data.source, kind=train.kind,
                      normalization=train.normalization.to_dict()),
        trained_by=config.train.mode,
    )

    def export(directory: Path, source: str) -> None:
        state = student.module.state_dict()
        if source == "ema":
            state = {**state, **student.emas.slow.shadow}
        save_model(directory, state, info)

    evaluate = few_step_evaluator(config, judge) if (judge is not None and distill) else None
    return TrainingSetup(
        student=student,
        data=ArrayBatches(train),
        training_cond=label_dropout(train.num_classes, config.model.label_dropout),
        num_tokens=None,
        allow_teacher=distill,
        evaluate=evaluate,
        export=export,
    )
