"""Typed, nested run configuration: YAML files plus dotted command-line overrides.

Every field has one default and one line of help (its docstring below the field). Loading rejects unknown
keys (with a suggestion) and values of the wrong type, naming the dotted field. The resolved config is saved
beside every output (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_text_atomic
from .core.calibration import DEFAULT_SCALES
from .core.ema import EMASchedule
from .core.jumps import JumpSampling
from .family_defaults import DIFFUSERS_KINDS, FAMILY_DEFAULTS, family_defaults
from .lora_settings import LoraSettings


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field and the fix."""


@dataclass
class DataConfig:
    source: str = "digits"
    """Toy name (checkerboard, 8gaussians, moons, spirals, rings), "digits", a .npz file, or a latent cache dir."""
    holdout_fraction: float = 0.2
    """Fraction of the data held out for evaluation (images and .npz files)."""
    num_toy_samples: int = 100_000
    """Training samples drawn for a 2-D toy distribution."""
    split_seed: int = 0
    """Seed of the train/held-out split (fixed across training seeds so runs compare on the same data)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


@dataclass
class ModelConfig:
    kind: str = "auto"
    """Network: auto (mlp up to 1024 values per sample, else convnet), mlp, convnet, or a diffusers family."""
    width: int = 256
    """mlp: hidden width."""
    depth: int = 4
    """mlp: residual blocks."""
    channels: int = 64
    """convnet: base channels."""
    blocks: int = 2
    """convnet: residual blocks per level."""
    label_dropout: float = 0.1
    """Condition dropout in training, for classifier-free guidance: the probability of replacing a class label by
    the null label (built-in networks) or a prompt by the empty prompt (diffusers families, train.mode=pretrain)."""
    guidance_scale: float | None = None
    """Classifier-free guidance weight w (student, targets and sampling alike); None = 0 for built-in networks on
    labelled data. Real-CFG families default to theirs (SD3 3.5, Lumina 2 3: shortcutfm/family_defaults.py); Flux
    has no real CFG (its guidance input is drawn per sample in training), so the field is refused there."""
    fold_guidance: bool = False
    """Classifier-free guidance folded into the student (real-CFG families, labelled built-in data; distillation):
    targets use the guided teacher, the student's own prediction (and its EMAs') is one plain conditional pass, so
    the student samples with guidance off at half the passes per step."""
    pretrained: str = ""
    """Diffusers families: local path or hub id of the pretrained pipeline (its transformer is the teacher)."""
    dtype: str = "float32"
    """Dtype of the frozen base weights (float32, bfloat16, float16)."""
    quantize: str = "none"
    """Diffusers LoRA runs: store the frozen base's linear weights quantized: none, int8 (torchao weight-only, CPU
    and GPU, half of bf16) or nf4 (bitsandbytes, CUDA, a quarter); adapters and EMAs stay float32."""
    gradient_checkpointing: bool = False
    """Diffusers families: recompute activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"model.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantize not in ("none", "int8", "nf4"):
            raise ConfigError(f"model.quantize must be none, int8 or nf4, got {self.quantize!r}")
        for name in ("width", "depth", "channels", "blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant or cosine (to 0 at train.steps)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 = off). The paper: 10 for Flux, 2 for SD3."""
    optimizer: str = "adamw"
    """adamw (torch) or adamw8bit (bitsandbytes: 8-bit moment states, a quarter of AdamW's state memory)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f'optim.schedule must be "constant" or "cosine", got {self.schedule!r}')
        if self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.grad_clip and optim.warmup_steps must be >= 0")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f'optim.optimizer must be "adamw" or "adamw8bit", got {self.optimizer!r}')


@dataclass
class TrainConfig:
    mode: str = "distill"
    """pretrain (from scratch; use jumps.flow_fraction=1 for plain flow matching) or distill (SCFM from a teacher)."""
    teacher: str = ""
    """distill with built-in models: the teacher's model directory (a pretrain run's output_dir/model)."""
    steps: int = 4000
    """Optimiser steps."""
    batch_size: int = 256
    """Global batch size of one optimizer step: split across processes, then into gradient_accumulation
    micro-batches (per-device micro-batch = batch_size / (processes * gradient_accumulation))."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step (memory: one micro-batch's activations at a time). The step's random draws
    are those of the whole batch, so a run with accumulation reproduces the run without it."""
    seed: int = 0
    """Seed of everything: data order, noise, jumps, initialisation."""
    output_dir: str = "runs/scfm"
    """Where checkpoints, the exported model, logs and config.yaml are written."""
    checkpoint_every: int = 500
    """Steps between resumable checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (the best one is kept separately)."""
    log_every: int = 50
    """Steps between log lines / tracker points."""
    mixed_precision: str = "no"
    """Accelerate mixed precision: no, bf16 or fp16."""
    tracker: str = ""
    """Optional Accelerate tracker: tensorboard or wandb (empty = none)."""
    shard: bool = False
    """Diffusers LoRA runs on several processes: shard the frozen base, the adapters and their EMAs with FSDP2
    (each process holds 1/N of the weights) instead of a full copy per process (data parallel)."""
    on_nonfinite: str = "stop"
    """A NaN or infinite loss or gradient: stop (one-line error, nothing written) or skip (redraw the step's batch,
    at most 32 times in a row; the weights and EMAs never see the bad values)."""

    def __post_init__(self) -> None:
        if self.mode not in ("pretrain", "distill"):
            raise ConfigError(f'train.mode must be "pretrain" or "distill", got {self.mode!r}')
        if self.steps < 1 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ConfigError("train.steps, train.batch_size and train.gradient_accumulation must be >= 1")
        if self.batch_size % self.gradient_accumulation:
            raise ConfigError(f"train.batch_size={self.batch_size} must be a multiple of "
                              f"train.gradient_accumulation={self.gradient_accumulation}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f'train.on_nonfinite must be "stop" or "skip", got {self.on_nonfinite!r}')
        if self.tracker not in ("", "tensorboard", "wandb"):
            raise ConfigError(f'train.tracker must be "", "tensorboard" or "wandb", got {self.tracker!r}')


@dataclass
class EvalConfig:
    every: int = 250
    """Steps between few-step evaluations during training, which select the best checkpoint (0 = off)."""
    select_steps: int = 3
    """Euler steps of the metric that selects the best checkpoint."""
    select_shift: float | str = 1.0
    """Sampling shift of that metric and of the validation grids (diffusers families: their sampling shift, Flux
    "dynamic"; also the shift `shortcutfm eval` sweeps LoRA runs at)."""
    num_samples: int = 2000
    """Samples per evaluation during training (diffusers runs without validation prompts: cached prompts)."""
    sweep_steps: tuple[int, ...] = (1, 2, 3, 4, 8, 16, 32)
    """Step counts of the final sweep."""
    sweep_shifts: tuple[float, ...] = (1.0, 3.0)
    """Sampling shifts of the final sweep."""
    sweep_samples: int = 10_000
    """Samples per row of the final sweep (vectors: >= 10,000 for the energy distance)."""
    seed: int = 1234
    """Seed of the evaluation noise (the same noise for every model and step count)."""

    def __post_init__(self) -> None:
        self.sweep_steps = tuple(self.sweep_steps)
        self.sweep_shifts = tuple(self.sweep_shifts)
        if self.every < 0 or self.select_steps < 1 or self.num_samples < 2 or self.sweep_samples < 2:
            raise ConfigError("eval.every >= 0, eval.select_steps >= 1 and sample counts >= 2 are required")
        if any(n < 1 for n in self.sweep_steps):
            raise ConfigError(f"eval.sweep_steps must all be >= 1, got {self.sweep_steps}")
        if isinstance(self.select_shift, str) and self.select_shift != "dynamic":
            raise ConfigError(f'eval.select_shift must be a number or "dynamic", got {self.select_shift!r}')


@dataclass
class ValidationConfig:
    prompts: tuple[str, ...] = ()
    """Diffusers runs: validation prompts. At each validation the student samples them at ``steps`` and a grid
    (one row per prompt, the teacher's 32-step image last) goes to RUN/validation/ and the tracker; their
    teacher-relative latent distance at eval.select_steps selects checkpoints. Empty: no grids, and the first
    eval.num_samples cached prompts select."""
    prompt_file: str = ""
    """A UTF-8 text file of validation prompts, one per line (instead of ``prompts``)."""
    steps: tuple[int, ...] = (1, 2, 4)
    """Student step counts shown in the grids."""
    every: int = 0
    """Steps between validation grids (0 = at every evaluation, eval.every; the end of training always has one)."""

    def __post_init__(self) -> None:
        self.prompts = tuple(self.prompts)
        self.steps = tuple(self.steps)
        if self.prompts and self.prompt_file:
            raise ConfigError("give validation.prompts or validation.prompt_file, not both")
        if not self.steps or any(n < 1 for n in self.steps):
            raise ConfigError(f"validation.steps must be step counts >= 1, got {self.steps}")
        if self.every < 0:
            raise ConfigError(f"validation.every must be >= 0, got {self.every}")
        if any(not p.strip() for p in self.prompts):
            raise ConfigError("validation.prompts holds an empty prompt; remove it")

    @property
    def enabled(self) -> bool:
        return bool(self.prompts or self.prompt_file)


@dataclass
class CalibrationConfig:
    steps: tuple[int, ...] = (1, 2, 3, 4, 8, 16, 32)
    """Distillation: after training, each of these step counts gets the scale ``a`` (built-in networks: weights
    ``teacher + a (student - teacher)``, the scale whose Euler samples are closest to the training data by the
    judge's metric; LoRA runs: the LoRA scale nearest 1 whose paired distance to the teacher's 32-step samples
    from the same noise is within one standard error of the closest scale's), sampled at eval.select_shift;
    ``shortcutfm sample``, ``eval`` and the step sweep then sample each step count at its scale (others at the
    nearest calibrated count's). Stored beside the model (calibration.json; a LoRA also in its file's metadata).
    Empty: no calibration."""
    scales: tuple[float, ...] = DEFAULT_SCALES
    """The scales tried for every step count (1 = the student as trained, 0 = the teacher)."""
    num_samples: int = 2048
    """Built-in networks: noise samples (and training labels) the calibration compares on, drawn with eval.seed
    (LoRA runs use the validation prompts, or eval.num_samples cached ones, and their noise)."""

    def __post_init__(self) -> None:
        self.steps, self.scales = tuple(self.steps), tuple(float(a) for a in self.scales)
        if any(n < 1 for n in self.steps):
            raise ConfigError(f"calibration.steps must be step counts >= 1, got {self.steps}")
        if self.steps and not self.scales:
            raise ConfigError("calibration.scales must hold at least one scale, e.g. [0.5, 1.0, 1.5]")
        if self.num_samples < 1:
            raise ConfigError(f"calibration.num_samples must be >= 1, got {self.num_samples}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    jumps: JumpSampling = field(default_factory=JumpSampling)
    ema: EMASchedule = field(default_factory=EMASchedule)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


# ---------------------------------------------------------------- strict loading


def _check_value(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads the words no/yes/off/on as booleans
            value = "yes" if value else "no"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def from_dict(cls: type, values: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {'.'.join(filter(None, [where, close[0]]))}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _check_value(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, KeyError) as exc:
        raise ConfigError(str(exc)) from None


def to_dict(config: Any) -> dict:
    """Plain YAML-ready dict (tuples become lists)."""

    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. train.steps=100")
        dotted, raw = item.split("=", 1)
        node = values
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"{dotted}='\"...\"'") from None
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Load a YAML config (or the defaults), apply overrides, validate."""
    values: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (data:, model:, train:, ...)")
        values = _merge(values, loaded)
    values = apply_overrides(values, list(overrides or []))
    model = values.get("model")
    kind = model.get("kind", "auto") if isinstance(model, dict) else "auto"
    if isinstance(kind, str) and kind in FAMILY_DEFAULTS:  # dataclass defaults < family < file < overrides
        values = _merge(family_defaults(kind), values)
    config = from_dict(Config, values)
    check_sections(config)
    return config


def _changed(section: Any, name: str) -> bool:
    default = type(section)()
    return getattr(section, name) != getattr(default, name)


def check_sections(config: Config) -> None:
    """Refuse fields that have no effect for the chosen ``model.kind`` and ``train.mode`` (each field has one
    meaning, and a silently ignored one is a trap). Raises ConfigError naming the field."""
    kind, mode = config.model.kind, config.train.mode
    where = f"model.kind={kind}" + (f", train.mode={mode}" if mode == "pretrain" else "")
    unused: list[str] = []
    calibration = [f"calibration.{f.name}" for f in dataclasses.fields(config.calibration)
                   if _changed(config.calibration, f.name)]
    if kind in DIFFUSERS_KINDS:
        if _changed(config.calibration, "num_samples"):  # LoRA runs calibrate on the validation prompts
            unused.append("calibration.num_samples (LoRA runs calibrate on the validation prompts or eval.num_samples "
                          "cached ones)")
        if mode == "pretrain" or config.model.fold_guidance:
            unused += [f"{name} (calibration is for distilled students without folded guidance)"
                       for name in calibration]
        unused += [f"model.{n}" for n in ("width", "depth", "channels", "blocks") if _changed(config.model, n)]
        unused += [f"data.{n}" for n in ("holdout_fraction", "num_toy_samples", "split_seed") if _changed(config.data, n)]
        if config.train.teacher:
            raise ConfigError(f"train.teacher has no effect with {where}: the teacher is model.pretrained's transformer;"
                              " remove train.teacher")
        if kind == "flux" and config.model.fold_guidance:
            raise ConfigError("model.fold_guidance has no effect with model.kind=flux: Flux has no real CFG (its "
                              "guidance is one embedded input); remove it")
        if kind == "flux" and config.model.guidance_scale is not None:
            raise ConfigError("model.guidance_scale has no effect with model.kind=flux: Flux's guidance is an input "
                              "drawn per sample in training (sample with `shortcutfm sample`'s default 3.5); remove it")
        if mode == "distill" and _changed(config.model, "label_dropout"):
            unused.append("model.label_dropout (caption dropout is for train.mode=pretrain)")
        if mode == "pretrain":
            unused += ["train.shard (sharding is for LoRA runs)"] if config.train.shard else []
            unused += ["model.fold_guidance (it distils a guided teacher)"] if config.model.fold_guidance else []
            unused += [f"lora.{f.name}" for f in dataclasses.fields(config.lora) if _changed(config.lora, f.name)]
            unused += ["model.quantize (a quantized base is for LoRA training)"] if _changed(config.model, "quantize") else []
            unused += [f"validation.{n}" for n in ("prompts", "prompt_file") if _changed(config.validation, n)]
    else:
        unused += [f"lora.{f.name}" for f in dataclasses.fields(config.lora) if _changed(config.lora, f.name)]
        unused += [f"model.{n}" for n in ("pretrained", "dtype", "gradient_checkpointing", "quantize")
                   if _changed(config.model, n)]
        unused += [f"validation.{f.name}" for f in dataclasses.fields(config.validation)
                   if _changed(config.validation, f.name)]
        if kind == "mlp":
            unused += [f"model.{n}" for n in ("channels", "blocks") if _changed(config.model, n)]
        if kind == "convnet":
            unused += [f"model.{n}" for n in ("width", "depth") if _changed(config.model, n)]
        if config.model.fold_guidance and not config.model.guidance_scale:
            raise ConfigError("model.fold_guidance needs model.guidance_scale > 0 (the CFG weight to fold in) on "
                              "labelled data; set it, or remove fold_guidance")
        if config.eval.select_shift == "dynamic":
            raise ConfigError('eval.select_shift="dynamic" needs a diffusers family (it depends on the image size); '
                              "give a number")
        if mode == "pretrain" and config.train.teacher:
            unused.append("train.teacher (train.mode=pretrain trains from scratch)")
        if mode == "pretrain" and config.model.fold_guidance:
            unused.append("model.fold_guidance (it distils a guided teacher)")
        if mode == "pretrain" or config.model.fold_guidance:  # folded: no common line of teacher and student
            unused += [f"{name} (calibration is for distilled students without folded guidance)"
                       for name in calibration]
        if config.train.shard:
            unused.append("train.shard (sharding is for diffusers LoRA runs)")
    if unused:
        raise ConfigError(f"{', '.join(unused)}: no effect with {where}; remove "
                          + ("it" if len(unused) == 1 else "them"))


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def save_config(config: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False), what="config")
