"""Atomic, pickle-free checkpoints: safetensors for every tensor, JSON/YAML for the rest.

A checkpoint is a directory ``step-00001000/`` holding ``student.safetensors`` (trainable weights),
``ema.safetensors``, ``optimizer.safetensors`` + ``optimizer.json``, ``trainer_state.json`` and, for fp16 runs,
``scaler.json`` (the loss scaler). It is written into a temporary sibling directory and renamed into place
(:mod:`shortcutfm.atomic`), so a killed run or a failed write never leaves a half-written checkpoint under a
real name, and the previous checkpoints stay usable.

Optimizer state is stored as safetensors plus JSON rather than with ``torch.save`` (which pickles): loading
a checkpoint must never run code from the file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, write_json_atomic

__all__ = ["TrainerState", "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "list_checkpoints", "prune_checkpoints", "step_name", "write_json_atomic", "LoadedCheckpoint"]

CHECKPOINT_PREFIX = "step-"


@dataclass
class EvalRecord:
    """One evaluation during training: the selection metric's value at a step (lower is better)."""

    step: int
    metric: str  # e.g. "energy_distance@3", "latent_mse_to_teacher32@3"
    value: float


@dataclass
class TrainerState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[EvalRecord] = field(default_factory=list)  # every evaluation, in order
    skipped: int = 0  # attempts that changed nothing: fp16 overflows, or non-finite steps redrawn (on_nonfinite=skip)

    def __post_init__(self) -> None:  # trainer_state.json holds the records as mappings
        self.history = [r if isinstance(r, EvalRecord) else EvalRecord(**r) for r in self.history]

    @property
    def selection_metric(self) -> str | None:
        """The name of the metric that selected the deployed checkpoint (None: no evaluation ran)."""
        return self.history[-1].metric if self.history else None


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (incomplete, corrupt, or of another model); the message says why."""


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().contiguous().cpu()
        # safetensors refuses tensors that share memory (bitsandbytes' 8-bit AdamW shares its quantization maps)
        pointer = value.untyped_storage().data_ptr() if value.numel() else None
        out[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    save_file(out, str(path))


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able metadata. A parameter's state
    may nest mappings (bitsandbytes' 8-bit AdamW keeps its quantization state in one): their keys join with "/"."""
    tensors, scalars = {}, {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)
        elif torch.is_tensor(value):
            tensors[prefix] = value
        else:
            scalars[prefix] = value

    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            walk(f"{param_id}.{key}", value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, path = name.split(".", 1)
        node = state.setdefault(int(param_id), {})
        *parents, leaf = path.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    name: str,
    *,
    student: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict,
    trainer_state: TrainerState,
    scaler: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``run_dir/checkpoints/name`` atomically and return its path.

    Raises :class:`~shortcutfm.atomic.WriteError` (nothing written under ``name``) if a write fails."""
    final = Path(run_dir) / "checkpoints" / name
    with atomic_path(final, directory=True, what="checkpoint") as tmp:
        save_tensors(student, tmp / "student.safetensors")
        save_tensors(ema, tmp / "ema.safetensors")
        opt_tensors, opt_meta = flatten_optimizer(optimizer)
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(trainer_state), indent=2))
        if scaler is not None:
            (tmp / "scaler.json").write_text(json.dumps(scaler))
        for filename, text in (extra_files or {}).items():
            (tmp / filename).write_text(text)
    return final


@dataclass
class LoadedCheckpoint:
    path: Path
    student: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    trainer_state: TrainerState
    scaler: dict | None = None  # the fp16 loss scaler's state_dict, if the run had one


_EARLIER = "delete that checkpoint folder to resume from an earlier one"


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:  # truncated or garbled file
        raise CheckpointError(f"checkpoint file {path} is corrupt ({error}); {_EARLIER}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({error}); {_EARLIER}") from None


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint; :class:`CheckpointError` (one line naming the file) if it is incomplete or corrupt."""
    path = Path(path)
    required = ["student.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json"]
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); {_EARLIER}")
    meta, optimizer_tensors = _read_json(path / "optimizer.json"), _read_tensors(path / "optimizer.safetensors")
    trainer_json = _read_json(path / "trainer_state.json")
    try:
        optimizer = unflatten_optimizer(optimizer_tensors, meta)
        trainer_state = TrainerState(**trainer_json)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {path} has malformed optimizer or trainer state ({error}); {_EARLIER}") from None
    return LoadedCheckpoint(
        path=path,
        student=_read_tensors(path / "student.safetensors"),
        ema=_read_tensors(path / "ema.safetensors"),
        optimizer=optimizer,
        trainer_state=trainer_state,
        scaler=_read_json(path / "scaler.json") if (path / "scaler.json").is_file() else None,
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def step_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"
