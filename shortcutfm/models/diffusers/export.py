"""Export a LoRA student as standard diffusers LoRA files that ``Pipeline.load_lora_weights`` loads unchanged.

The files use the pipeline class's own ``save_lora_weights`` (keys ``transformer.<module>.lora_A.weight``,
the peft config stored as safetensors metadata, so alpha != rank loads right):

    export_lora(student, "out/")       # out/pytorch_lora_weights.safetensors (+ ema_lora_weights.safetensors)
    pipe.load_lora_weights("out/", adapter_name="scfm")
    pipe.load_lora_weights("out/", weight_name="ema_lora_weights.safetensors", adapter_name="scfm_ema")
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from .families import ModelFamily, get_family
from .lora_student import SLOW_EMA, STUDENT, LoraStudent

STUDENT_WEIGHTS = "pytorch_lora_weights.safetensors"
EMA_WEIGHTS = "ema_lora_weights.safetensors"


def save_adapter(
    transformer: nn.Module,
    adapter_name: str,
    family: str | ModelFamily,
    directory: str | Path,
    weight_name: str = STUDENT_WEIGHTS,
    dtype: torch.dtype | None = None,
    is_main_process: bool = True,
) -> Path:
    """Save one peft adapter of ``transformer`` in the diffusers LoRA format of ``family``'s pipeline.

    ``dtype`` casts the saved tensors (e.g. ``torch.bfloat16`` halves the file); None keeps float32.
    """
    if adapter_name not in getattr(transformer, "peft_config", {}):
        raise ValueError(f"the transformer has no adapter {adapter_name!r}")
    from ...training.sharding import full_tensor

    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    # whole tensors of a sharded (FSDP2) transformer: every process gathers, only the main process writes
    state = {name: full_tensor(tensor.detach()).to("cpu", dtype or tensor.dtype).contiguous() for name, tensor in state.items()}
    config = transformer.peft_config[adapter_name].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in peft; JSON needs a list
    directory = Path(directory)
    get_family(family).pipeline_class.save_lora_weights(
        directory, transformer_lora_layers=state, weight_name=weight_name, is_main_process=is_main_process,
        transformer_lora_adapter_metadata=config,
    )
    return directory / weight_name


def export_lora(
    student: LoraStudent,
    directory: str | Path,
    *,
    include_ema: bool = True,
    dtype: torch.dtype | None = None,
    is_main_process: bool = True,
) -> list[Path]:
    """Write the student's LoRA (and the slow EMA's if ``include_ema``) into ``directory``; return the files."""
    paths = [save_adapter(student.transformer, STUDENT, student.family, directory, STUDENT_WEIGHTS, dtype,
                          is_main_process)]
    if include_ema:
        paths.append(save_adapter(student.transformer, SLOW_EMA, student.family, directory, EMA_WEIGHTS, dtype,
                                  is_main_process))
    return paths


#: the step-count calibration of an exported LoRA: a file beside it, and the same JSON in its safetensors metadata
CALIBRATION_FILE = "calibration.json"
CALIBRATION_METADATA_KEY = "shortcutfm_step_calibration"


def write_calibration(lora_dir: str | Path, calibration) -> None:
    """Store a :class:`~shortcutfm.core.calibration.StepCalibration` beside the LoRA in ``lora_dir`` and in the
    LoRA file's metadata (the other metadata, e.g. diffusers' adapter config, is kept)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ...atomic import atomic_path, write_text_atomic

    lora_dir = Path(lora_dir)
    text = json.dumps(calibration.to_dict())
    weights = lora_dir / STUDENT_WEIGHTS
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(weights))
    with atomic_path(weights, what="LoRA weights") as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, CALIBRATION_METADATA_KEY: text})
    write_text_atomic(lora_dir / CALIBRATION_FILE, json.dumps(calibration.to_dict(), indent=2) + "\n",
                      what="calibration")


def read_calibration(lora_dir: str | Path):
    """The LoRA's step-count calibration (``calibration.json`` beside it, else its file's metadata), or None."""
    import json

    from safetensors import safe_open

    from ...core.calibration import StepCalibration

    lora_dir = Path(lora_dir)
    path = lora_dir / CALIBRATION_FILE
    try:
        if path.is_file():
            return StepCalibration.from_dict(json.loads(path.read_text()))
        weights = lora_dir / STUDENT_WEIGHTS
        if weights.is_file():
            with safe_open(str(weights), framework="pt") as handle:
                text = (handle.metadata() or {}).get(CALIBRATION_METADATA_KEY)
            return StepCalibration.from_dict(json.loads(text)) if text else None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the step calibration of {lora_dir} is malformed ({exc}); delete {CALIBRATION_FILE} or "
                         "pass --lora-scale") from None
    return None
