"""Diffusers model families for SCFM: velocity adapters, the LoRA student, export and pipeline sampling.

Needs the ``diffusers`` extra (diffusers, peft, transformers). Nothing here is imported by ``shortcutfm.core``.
"""

from .adapters import adapter_tensors, tuner_layers, use_adapter
from .export import EMA_WEIGHTS, STUDENT_WEIGHTS, export_lora, save_adapter
from .families import (
    FAMILIES,
    FLUX,
    FLUX2,
    LUMINA2,
    QWEN_IMAGE,
    SD3,
    WAN,
    DiffusersVelocity,
    Flux2Velocity,
    FluxVelocity,
    Lumina2Velocity,
    ModelFamily,
    PromptEncoding,
    QwenImageVelocity,
    SD3Velocity,
    WanVelocity,
    family_of_pipeline,
    get_family,
    load_transformer,
)
from .guidance import EmbeddedGuidance, RealGuidance
from .inference import fuse_lora, sample_with_pipeline, sampling_grid
from .lora_student import FAST_EMA, SLOW_EMA, STUDENT, LoraSettings, LoraStudent

__all__ = [
    "adapter_tensors", "tuner_layers", "use_adapter",
    "EMA_WEIGHTS", "STUDENT_WEIGHTS", "export_lora", "save_adapter",
    "FAMILIES", "FLUX", "FLUX2", "LUMINA2", "QWEN_IMAGE", "SD3", "WAN", "DiffusersVelocity", "Flux2Velocity",
    "FluxVelocity",
    "Lumina2Velocity", "ModelFamily", "PromptEncoding", "QwenImageVelocity", "SD3Velocity", "WanVelocity",
    "family_of_pipeline", "get_family", "load_transformer",
    "EmbeddedGuidance", "RealGuidance",
    "sample_with_pipeline", "sampling_grid", "fuse_lora",
    "FAST_EMA", "SLOW_EMA", "STUDENT", "LoraSettings", "LoraStudent",
]
