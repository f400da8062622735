"""``shortcutfm eval`` for a LoRA: a training run (its config supplies the pipeline, shift, guidance and image size)
or a LoRA folder on a named pipeline, evaluated either with the proving ground's exact metrics (a world pipeline,
no prompt file) or with FID / CLIP score on a prompt file (:mod:`.lora_eval`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..config import Config, load_config


def evaluate_lora_model(run_dir: Path | None, overrides: Sequence[str] = (), *, out: Path, pipeline: str | None = None,
                        lora: Path | None = None, prompts: Path | None = None, steps: tuple[int, ...] | None = None,
                        reference: Path | None = None, clip: str | None = None,
                        inception_weights: Path | None = None, no_fid: bool = False, num_prompts: int = 512,
                        lora_scale: float | None = None):
    """Evaluate ``run_dir``'s deployed LoRA (or ``lora`` on ``pipeline``) and write ``out/``; returns the report.

    ``overrides`` change the run's config (they need ``run_dir``); ``steps``: the student's step counts (default:
    the run's ``eval.sweep_steps``, else 1, 2, 3, 4, 8); ``lora_scale``: one adapter scale for every row (default:
    each step count's calibrated scale, else 1). A run's model card gets the evaluation table."""
    from ..sampling import _cache_layout, find_lora_dir

    cfg = _run_config(run_dir, list(overrides))
    if lora is not None:
        lora_dir = find_lora_dir(lora)
        if lora_dir is None:
            raise FileNotFoundError(f"--lora {lora}: no pytorch_lora_weights.safetensors there (or in its model/)")
    else:  # the deployed model; a run stopped before its end has only best/ (the best checkpoint so far)
        lora_dir = next((d for d in (run_dir / "model", run_dir / "best") if d.is_dir()), run_dir)
    pretrained = pipeline or (cfg.model.pretrained if cfg else None)
    if not pretrained:
        raise ValueError("--lora needs --pipeline (the base pipeline the LoRA was trained on)")
    if prompts is None:
        return _evaluate_on_world(cfg, Path(pretrained), lora_dir, out, num_prompts, lora_scale)
    from ..preparation.inputs import read_prompt_file
    from .lora_eval import LoraEvalSettings, evaluate_lora, inception_features

    layout = _cache_layout(cfg.data.source) if cfg else None
    settings = LoraEvalSettings(
        pipeline=str(pretrained), lora_dir=str(lora_dir), prompts=read_prompt_file(prompts)[:num_prompts],
        steps=steps or (cfg.eval.sweep_steps if cfg else (1, 2, 3, 4, 8)),
        shift=cfg.eval.select_shift if cfg else None, guidance=cfg.model.guidance_scale if cfg else None,
        student_guidance=0.0 if cfg and cfg.model.fold_guidance else None,
        lora_scale=lora_scale, seed=cfg.eval.seed if cfg else 1234,
        height=layout["height"] if layout else None, width=layout["width"] if layout else None,
        max_sequence_length=layout["max_sequence_length"] if layout else None,
        reference_dir=str(reference) if reference else None,
    )
    if reference is not None and not reference.is_dir():
        raise FileNotFoundError(f"--reference {reference}: folder not found")
    weights = str(inception_weights) if inception_weights else None
    features = None if no_fid else inception_features(weights)
    report = evaluate_lora(settings, out, fid_features=features, inception_weights=weights, clip=clip)
    if run_dir is not None and lora is None and (lora_dir / "README.md").is_file():
        card_with_evaluation(run_dir, lora_dir, cfg, report.markdown)
    return report


def _run_config(run_dir: Path | None, overrides: list[str]) -> Config | None:
    if run_dir is None:
        if overrides:
            raise ValueError(f"config overrides {overrides} need RUN (a training run folder)")
        return None
    run_config = run_dir / "config.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(f"{run_config} not found: RUN must be a training run folder (train.output_dir)")
    cfg = load_config(run_config, overrides)
    if cfg.train.mode != "distill" or cfg.model.kind in ("auto", "mlp", "convnet"):
        raise ValueError(f"{run_dir} is not a LoRA run (built-in models: --teacher/--student)")
    return cfg


def _evaluate_on_world(cfg: Config | None, pretrained: Path, lora_dir: Path, out: Path, num_prompts: int,
                       lora_scale: float | None):
    """The proving ground's held-out sweep (fd_data, fd_teacher, adherence) for a run on a world pipeline."""
    from ..t2i.evaluate import is_world_pipeline, training_guidance_scale

    if cfg is None or not is_world_pipeline(pretrained):
        raise ValueError("give --prompts FILE (one prompt per line) to evaluate a LoRA with FID and CLIP score")
    from ..t2i.demo import evaluate_lora_run
    from ..workflows import cache_dir

    folded = {"student_guidance_scale": 0.0, "student_name": "student-1pass"} if cfg.model.fold_guidance else {}
    return evaluate_lora_run(pretrained, lora_dir, out, guidance_scale=training_guidance_scale(cfg), **folded,
                             shift=cfg.eval.select_shift, num_prompts=num_prompts, seed=cfg.eval.seed,
                             lora_scale=lora_scale, cache_dir=cache_dir() / "t2i")


def card_with_evaluation(run_dir: Path, model_dir: Path, cfg: Config, table: str) -> None:
    """Rewrite the run's model card with the evaluation table."""
    from ..model_card import write_model_card
    from ..training.checkpoint import TrainerState

    state_file = run_dir / "trainer_state.json"
    if state_file.is_file():
        write_model_card(model_dir, cfg, TrainerState(**json.loads(state_file.read_text())), evaluation=table)
