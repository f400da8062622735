"""Atomic, pickle-free checkpoints: safetensors for every tensor, JSON/YAML for the rest.

A checkpoint is a directory ``step-00001000/`` holding ``student.safetensors`` (trainable weights),
``ema.safetensors``, ``optimizer.safetensors`` + ``optimizer.json`` and ``trainer_state.json``. It is written
into a temporary sibling directory and renamed into place, so a killed run never leaves a half-written
checkpoint under a real name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainerState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)  # evaluation rows: {"step", "metric", "value"}


def write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able metadata."""
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            name = f"{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    name: str,
    *,
    student: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict,
    trainer_state: TrainerState,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``run_dir/checkpoints/name`` atomically and return its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    save_tensors(student, tmp / "student.safetensors")
    save_tensors(ema, tmp / "ema.safetensors")
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(trainer_state), indent=2))
    for filename, text in (extra_files or {}).items():
        (tmp / filename).write_text(text)
    final = root / name
    if final.exists():
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


@dataclass
class LoadedCheckpoint:
    path: Path
    student: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    trainer_state: TrainerState


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    path = Path(path)
    required = ["student.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json"]
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); delete it to resume from an earlier one")
    meta = json.loads((path / "optimizer.json").read_text())
    return LoadedCheckpoint(
        path=path,
        student=load_file(str(path / "student.safetensors")),
        ema=load_file(str(path / "ema.safetensors")),
        optimizer=unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta),
        trainer_state=TrainerState(**json.loads((path / "trainer_state.json").read_text())),
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
