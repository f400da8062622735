"""Build, save and load the built-in velocity networks (weights in safetensors, architecture in JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, write_text_atomic
from ..config import ModelConfig, from_dict
from ..core.calibration import StepCalibration
from .convnet import VelocityConvNet
from .mlp import VelocityMLP

MODEL_WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"
#: a calibrated student's scales per step count, and the teacher weights its interpolation starts from
CALIBRATION = "calibration.json"
TEACHER_WEIGHTS = "teacher.safetensors"
AUTO_MLP_MAX_VALUES = 1024


@dataclass
class DataInfo:
    """The data a built-in model was trained on."""

    name: str = ""  # the data set's name (toy name, "digits", the .npz file's stem)
    source: str = ""  # data.source of the training config
    kind: str = "vector"  # "vector" (2-D toys, .npz vectors) or "image"
    normalization: dict = field(default_factory=dict)  # Normalization.to_dict(): data space <-> model space


@dataclass
class ModelInfo:
    """Everything needed to rebuild a built-in model and to map its samples back to data space."""

    model: dict  # the ModelConfig fields, as written to model.json (typed: model_config)
    sample_shape: list[int]
    num_classes: int
    data: DataInfo = field(default_factory=DataInfo)
    trained_by: str = ""  # "pretrain" or "distill"

    def __post_init__(self) -> None:  # model.json holds the data section as a mapping
        if isinstance(self.data, dict):
            self.data = DataInfo(**self.data)

    @property
    def model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, self.model, "model")


def resolve_kind(config: ModelConfig, sample_shape: tuple[int, ...]) -> str:
    if config.kind != "auto":
        return config.kind
    numel = int(torch.Size(sample_shape).numel())
    return "mlp" if numel <= AUTO_MLP_MAX_VALUES or len(sample_shape) != 3 else "convnet"


def build_model(config: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh built-in network for samples of ``sample_shape`` and ``num_classes`` labels (0 = unconditional)."""
    kind = resolve_kind(config, sample_shape)
    if kind == "mlp":
        return VelocityMLP(sample_shape, width=config.width, depth=config.depth, num_classes=num_classes)
    if kind == "convnet":
        return VelocityConvNet(sample_shape, channels=config.channels, blocks=config.blocks, num_classes=num_classes)
    raise ValueError(f"model.kind {config.kind!r} is not a built-in network (mlp, convnet or auto)")


def save_model(directory: Path, state: dict[str, torch.Tensor], info: ModelInfo) -> None:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` atomically (temp dir, then rename)."""
    with atomic_path(directory, directory=True, what="model") as tmp:
        save_file({k: v.detach().contiguous().cpu().float() for k, v in state.items()}, str(tmp / MODEL_WEIGHTS))
        (tmp / MODEL_INFO).write_text(json.dumps(asdict(info), indent=2))


@dataclass
class LoadedModel:
    module: nn.Module
    info: ModelInfo
    calibration: StepCalibration | None = None  # a calibrated student's scales (with teacher_state)
    teacher_state: dict[str, torch.Tensor] | None = None


def save_calibration(directory: Path, calibration: StepCalibration, teacher_state: dict[str, torch.Tensor]) -> None:
    """Write the calibration and the teacher's weights beside a saved model (the teacher first: a model directory
    with calibration.json always has its teacher)."""
    directory = Path(directory)
    with atomic_path(directory / TEACHER_WEIGHTS, what="teacher weights") as tmp:
        save_file({k: v.detach().contiguous().cpu().float() for k, v in teacher_state.items()}, str(tmp))
    write_text_atomic(directory / CALIBRATION, json.dumps(calibration.to_dict(), indent=2) + "\n", what="calibration")


def load_model(directory: str | Path) -> LoadedModel:
    """Load a built-in model directory written by :func:`save_model` (a training run's ``model/``)."""
    directory = Path(directory)
    if (directory / "model" / MODEL_INFO).is_file():  # a run directory was given
        directory = directory / "model"
    info_path, weights_path = directory / MODEL_INFO, directory / MODEL_WEIGHTS
    if not info_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a shortcutfm model directory (needs {MODEL_INFO} and {MODEL_WEIGHTS}); "
            "pass a training run's output directory or its model/ folder"
        )
    try:
        info = ModelInfo(**json.loads(info_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{info_path} is malformed ({exc}); re-export the model") from None
    module = build_model(info.model_config, tuple(info.sample_shape), info.num_classes)
    module.load_state_dict(load_file(str(weights_path)))
    calibration = teacher_state = None
    if (directory / CALIBRATION).is_file():
        try:
            calibration = StepCalibration.from_dict(json.loads((directory / CALIBRATION).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{directory / CALIBRATION} is malformed ({exc}); delete it to sample the student as "
                             "trained, or re-run the calibration") from None
        if not (directory / TEACHER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{directory / CALIBRATION} needs {TEACHER_WEIGHTS} beside it; delete "
                                    f"{CALIBRATION} to sample the student as trained")
        teacher_state = load_file(str(directory / TEACHER_WEIGHTS))
    return LoadedModel(module=module.eval(), info=info, calibration=calibration, teacher_state=teacher_state)
