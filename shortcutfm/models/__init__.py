"""Velocity models: the built-in networks and the students the trainer drives.

Diffusers families live in :mod:`shortcutfm.models.diffusers` (needs the ``diffusers`` extra).
"""

from .builtin import DataInfo, LoadedModel, ModelInfo, build_model, load_model, save_model
from .convnet import VelocityConvNet
from .mlp import VelocityMLP
from .student import FullStudent, Student

__all__ = [
    "DataInfo", "LoadedModel", "ModelInfo", "build_model", "load_model", "save_model",
    "VelocityConvNet", "VelocityMLP", "FullStudent", "Student",
]
