"""The model card of a diffusers LoRA run: ``model/README.md`` in the Hugging Face Hub's format.

YAML metadata (``base_model``, ``library_name: diffusers``, ``pipeline_tag``, tags) through huggingface_hub's
``ModelCardData``, then what a user needs to sample the LoRA as it was trained: the steps it was selected on, the
grid shift, the LoRA scale and the guidance, with a diffusers snippet, and the selection readings of the run.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import write_text_atomic
from .config import Config
from .training.checkpoint import TrainerState

__all__ = ["write_model_card", "CARD_NAME"]

CARD_NAME = "README.md"


def _card_body(config: Config, state: TrainerState, pipeline_class: str, sampling_shift,
               evaluation: str | None = None, calibration=None) -> str:
    lora, train, model = config.lora, config.train, config.model
    steps = config.eval.select_steps
    guidance = "the family's default" if model.guidance_scale is None else f"w = {model.guidance_scale:g}"
    if model.fold_guidance:
        guidance = (f"off (the teacher's w = {model.guidance_scale:g} is folded into the LoRA: one pass per step; "
                    "for SD3 pipelines pass guidance_scale=1)")
    rows = "\n".join(f"| {h.step} | {h.metric} | {h.value:.4g} |" for h in state.history)
    selected = (f"the checkpoint of step {state.best_step} (best `{state.selection_metric}` = {state.best_metric:.4g})"
                if state.best_step else f"the final checkpoint (step {state.step})")
    lines = [
        f"# SCFM {steps}-step LoRA for `{model.pretrained}`", "",
        f"A few-step LoRA distilled from `{model.pretrained}` with SCFM (velocity self-distillation without a "
        "step-size input), made with shortcutfm.", "",
        "## How to sample", "",
        f"- **Steps:** {steps} Euler steps (the step count the checkpoint was selected on); 2-8 work.",
        f"- **Grid shift:** {sampling_shift} (`shortcutfm sample --shift` overrides it).",
        ("- **LoRA scale per step count** (calibrated: 1 unless another scale is clearly closer to the teacher's 32 "
         "steps; `shortcutfm sample` and "
         "`eval` use it): " + ", ".join(f"{n} steps: {a:g}" for n, a in calibration.scales.items())
         + "; in diffusers, `pipe.fuse_lora(lora_scale=...)` with the scale of your step count."
         if calibration is not None else "- **LoRA scale:** 1.0 (1 to 1.75 suits fewer steps)."),
        f"- **Guidance:** {guidance}" + ("." if model.fold_guidance else ", as in training."), "",
        "```bash",
        f"shortcutfm sample RUN_DIR --prompt \"...\" --steps {steps}",
        "```", "",
        "```python",
        f"from diffusers import {pipeline_class}",
        f"pipe = {pipeline_class}.from_pretrained(\"{model.pretrained}\")",
        "pipe.load_lora_weights(\"path/to/this/folder\", weight_name=\"pytorch_lora_weights.safetensors\")",
        "# few steps on the shifted grid: shortcutfm.models.diffusers.sample_with_pipeline(pipe, prompts, "
        f"num_steps={steps}, shift=...)",
        "```", "",
        "## Training", "",
        f"- {train.steps} optimizer steps at batch {train.batch_size}, AdamW lr {config.optim.lr:g}, "
        f"LoRA rank {lora.rank} (alpha {lora.alpha:g}), dual-EMA targets, seed {train.seed}.",
        f"- Data: the latent cache `{config.data.source}` (teacher-made samples or captioned images).",
        f"- Deployed: {selected}.", "",
    ]
    if evaluation:
        lines += ["## Evaluation", "", "`shortcutfm eval` of this LoRA (the same noise for every row):", "", evaluation, ""]
    if rows:
        lines += ["## Selection readings (lower is better)", "", "| step | metric | value |", "|---|---|---|", rows, ""]
    lines += ["The run's `config.yaml` (beside this folder) holds every setting."]
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: Path, config: Config, state: TrainerState, evaluation: str | None = None) -> Path:
    """Write ``model_dir/README.md`` for a diffusers LoRA run (``evaluation``: a markdown table of
    ``shortcutfm eval``, added as its own section); returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    from .models.diffusers import get_family

    family = get_family(config.model.kind)
    data = ModelCardData(
        base_model=config.model.pretrained or None, library_name="diffusers", pipeline_tag="text-to-image",
        tags=["lora", "text-to-image", "diffusers", "scfm", "few-step", "shortcutfm", family.name],
    )
    from .models.diffusers.export import read_calibration

    shift = config.eval.select_shift
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n"
                     + _card_body(config, state, family.pipeline_class.__name__, shift, evaluation,
                                  read_calibration(model_dir)))
    path = Path(model_dir) / CARD_NAME
    write_text_atomic(path, str(card), what="model card")
    return path
