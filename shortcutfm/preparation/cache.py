"""The prepared-data cache: layout on disk, content keys, and the reader the trainer uses.

A cache is a directory::

    manifest.json               family, model id, resolution, tensor shapes/dtypes, shard list, run settings
    uncond.safetensors          the empty prompt's text tensors (same keys as a record's text, batch dim 1)
    shard-00000.safetensors     records stacked along dim 0: latents (N, C, H, W), prompt_embeds (N, L, D),
    shard-00001.safetensors     pooled_prompt_embeds (N, D) and/or prompt_attention_mask (N, L); the shard's
    ...                         metadata "records" lists each record's key, caption, source and seed

A record's key is a sha256 of its content (image bytes or prompt + seed), its caption and the encoding
settings / model identity (:func:`content_key`), never its position, so reordering inputs changes nothing and
re-running prepare skips what is cached. Shards and the manifest are written atomically (see ``writer.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
UNCOND_NAME = "uncond.safetensors"
SHARD_GLOB = "shard-*.safetensors"
RERUN_HINT = "re-run `shortcutfm prepare` with the same inputs and out_dir (cached records are kept)"


class CacheError(ValueError):
    """A cache directory is missing, corrupt, or incompatible with the requested settings."""


@dataclass(frozen=True)
class CacheLayout:
    """What every record of one cache shares; appending with a different layout is refused."""

    family: str  # model family (a name of shortcutfm.models.diffusers.FAMILIES: flux, sd3, wan, ...)
    model_id: str  # hub id or local path of the pipeline that encoded the data
    height: int  # image height in pixels
    width: int  # image width in pixels
    max_sequence_length: int  # text tokens per prompt (L)


@dataclass(frozen=True)
class RecordInfo:
    """Where one record came from (stored in its shard's metadata)."""

    key: str  # content hash, see content_key
    caption: str  # the prompt the text tensors encode
    source: str  # image file name relative to the folder, or "teacher" for teacher-made records
    seed: int | None = None  # noise seed of a teacher-made record


def content_key(payload: bytes, caption: str, settings: Mapping[str, Any]) -> str:
    """sha256 hex key of ``payload`` (image bytes, or a seed for teacher data), ``caption`` and ``settings``."""
    digest = hashlib.sha256(b"shortcutfm-record-v1")
    for part in (json.dumps(dict(settings), sort_keys=True).encode(), caption.encode(), payload):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"{path} not found: {cache_dir} is not a prepared cache; run `shortcutfm prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{path} is unreadable ({error}); {RERUN_HINT}") from error
    required = {"format_version", "layout", "tensors", "shards", "num_records"}
    present = set(manifest) if isinstance(manifest, dict) else set()
    if not required <= present:
        raise CacheError(f"{path} lacks fields {sorted(required - present)}; {RERUN_HINT}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CacheError(
            f"{path} has cache format {manifest['format_version']}, this version reads {FORMAT_VERSION}; "
            "prepare the data again into a new directory"
        )
    return manifest


@dataclass
class Shard:
    """One shard file: its records, stacked tensors and the layout they were encoded with."""

    path: Path
    layout: CacheLayout
    records: list[RecordInfo]
    tensors: dict[str, Tensor]  # name -> (num_records, ...)


def shard_metadata(layout: CacheLayout, records: list[RecordInfo]) -> dict[str, str]:
    return {
        "format_version": str(FORMAT_VERSION),
        "layout": json.dumps(asdict(layout)),
        "records": json.dumps([asdict(record) for record in records]),
    }


def read_shard(path: Path) -> Shard:
    """Load one shard; :class:`CacheError` naming the file if it is missing or corrupt."""
    if not path.is_file():
        raise CacheError(f"shard {path} is missing; {RERUN_HINT}")
    try:
        with safe_open(str(path), framework="pt") as shard_file:
            metadata = shard_file.metadata() or {}
            layout = CacheLayout(**json.loads(metadata["layout"]))
            records = [RecordInfo(**info) for info in json.loads(metadata["records"])]
            tensors = {name: shard_file.get_tensor(name) for name in shard_file.keys()}
    except Exception as error:  # safetensors/json/TypeError: truncated, garbled or foreign files
        raise CacheError(f"shard {path} is corrupt ({type(error).__name__}: {error}); {RERUN_HINT}") from error
    for name, tensor in tensors.items():
        if tensor.shape[0] != len(records):
            raise CacheError(
                f"shard {path}: {name} has {tensor.shape[0]} rows for {len(records)} records; {RERUN_HINT}"
            )
    return Shard(path, layout, records, tensors)


def tensor_spec(tensor: Tensor, batched: bool) -> dict[str, Any]:
    """``{"shape": [...], "dtype": "float32"}`` of one record's tensor (batch dim dropped if ``batched``)."""
    shape = tensor.shape[1:] if batched else tensor.shape
    return {"shape": list(shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def check_shapes(tensors: Mapping[str, Tensor], expected: Mapping[str, Any], where: str, batched: bool) -> None:
    """Raise :class:`CacheError` unless ``tensors`` have exactly the manifest's keys, shapes and dtypes."""
    if set(tensors) != set(expected):
        raise CacheError(f"{where} holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, tensor in tensors.items():
        spec = tensor_spec(tensor, batched)
        if spec != expected[name]:
            raise CacheError(
                f"{where}: {name} is {spec['dtype']}{spec['shape']}, but the cache holds {expected[name]['dtype']}"
                f"{expected[name]['shape']} (mismatched latent/text shapes; prepare into a new directory)"
            )


class LatentCache:
    """All records of a prepared cache, loaded into memory (fine at this method's scale: tens to a few
    thousand records; a 1024px Flux record with 512 T5 tokens is about 5 MB in bf16).

    ``keys[i]`` is the content key of record ``i``; ``get(indices)`` gives batched tensors for the trainer;
    ``uncond`` holds the empty prompt's text tensors with batch dim 1.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.layout = CacheLayout(**self.manifest["layout"])
        expected = self.manifest["tensors"]
        if self.manifest["num_records"] == 0 or "latents" not in expected:
            raise CacheError(f"{self.path} holds no records yet; run `shortcutfm prepare` on some data first")
        parts: dict[str, list[Tensor]] = {name: [] for name in expected}
        self.records: list[RecordInfo] = []
        for entry in self.manifest["shards"]:
            shard_path = self.path / entry["file"]
            shard = read_shard(shard_path)
            check_shapes(shard.tensors, expected, f"shard {shard_path}", batched=True)
            for name, tensor in shard.tensors.items():
                parts[name].append(tensor)
            self.records.extend(shard.records)
        if len(self.records) != self.manifest["num_records"]:
            raise CacheError(
                f"{self.path / MANIFEST_NAME} lists {self.manifest['num_records']} records but its shards hold "
                f"{len(self.records)}; {RERUN_HINT}"
            )
        if len({record.key for record in self.records}) != len(self.records):
            raise CacheError(f"{self.path} holds duplicate record keys; {RERUN_HINT}")
        self.tensors = {name: torch.cat(chunks) if chunks else torch.empty(0) for name, chunks in parts.items()}
        self.uncond = self._read_uncond(expected)

    def _read_uncond(self, expected: Mapping[str, Any]) -> dict[str, Tensor]:
        uncond_path = self.path / UNCOND_NAME
        if not uncond_path.is_file():
            raise CacheError(f"{uncond_path} is missing; {RERUN_HINT}")
        try:
            uncond = load_file(str(uncond_path))
        except Exception as error:
            raise CacheError(f"{uncond_path} is corrupt ({error}); {RERUN_HINT}") from error
        text_expected = {name: spec for name, spec in expected.items() if name != "latents"}
        check_shapes(uncond, text_expected, str(uncond_path), batched=True)
        return uncond

    def __len__(self) -> int:
        return len(self.records)

    @property
    def keys(self) -> list[str]:
        """Content key of each record, in storage order."""
        return [record.key for record in self.records]

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        """Records ``indices`` (1-D integer tensor) as ``{name: (B, ...)}``: latents (B, C, H, W),
        prompt_embeds (B, L, D), and pooled_prompt_embeds (B, D) / prompt_attention_mask (B, L) by family."""
        indices = torch.as_tensor(indices)
        if indices.ndim != 1 or indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype}{list(indices.shape)}")
        if len(indices) and (int(indices.min()) < -len(self) or int(indices.max()) >= len(self)):
            raise IndexError(f"indices out of range for a cache of {len(self)} records")
        indices = indices.long() % max(len(self), 1)
        return {name: tensor.index_select(0, indices) for name, tensor in self.tensors.items()}

    def __repr__(self) -> str:
        layout = self.layout
        return (
            f"LatentCache({str(self.path)!r}, {len(self)} records, {layout.family} {layout.model_id!r}, "
            f"{layout.height}x{layout.width})"
        )
