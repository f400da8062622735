"""Appending records to a cache directory without ever losing what is already there.

Every shard and the manifest are written to a temporary file and then renamed (:mod:`shortcutfm.atomic`), so
an interrupted run or a failed write leaves only whole files. On opening, the writer trusts the shard files
themselves (each records its layout and its records' keys): a shard written just before a crash but missing
from the manifest is adopted, an unreadable one is renamed to ``<name>.corrupt`` (its records are encoded
again), and a cache prepared with a different layout is refused. One writer per directory at a time: the
writer holds the folder's lock (:mod:`shortcutfm.folder_lock`) from opening to ``close``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import atomic_path, write_bytes_atomic
from ..folder_lock import folder_lock
from .cache import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_GLOB,
    UNCOND_NAME,
    CacheError,
    CacheLayout,
    RecordInfo,
    check_shapes,
    read_shard,
    shard_metadata,
    tensor_spec,
)

logger = logging.getLogger(__name__)

LATENT_ENCODING = (  # recorded in the manifest
    "images: vae.encode(image).latent_dist.mean, then (z - shift_factor) * scaling_factor; "
    "teacher samples: the pipeline's output_type='latent' result (Flux unpacked to C, H, W)"
)


def _atomic_save(tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path, what="cache file") as temporary:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary), metadata=metadata)


class CacheWriter:
    """Adds records to the cache at ``cache_dir``; use as a context manager so that buffered records are
    written even when the run stops on an error.

    ``layout`` must equal the layout of an existing cache there; ``run_settings`` (JSON-able) is appended to
    the manifest's ``runs``. Records are buffered and written ``records_per_shard`` at a time. ``known_keys``:
    records held elsewhere (a multi-process run's merged cache) that count as cached.
    """

    def __init__(
        self, cache_dir: str | Path, layout: CacheLayout, run_settings: Mapping[str, Any], records_per_shard: int = 256,
        known_keys: set[str] | frozenset[str] = frozenset(),
    ):
        self.known_keys = frozenset(known_keys)
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.cache_dir = Path(cache_dir)
        self.layout = layout
        self.records_per_shard = records_per_shard
        self._lock = ExitStack()
        self._lock.enter_context(folder_lock(self.cache_dir, what="data cache", instead="another out_dir"))
        try:
            self._open(run_settings)
        except BaseException:
            self._lock.close()
            raise

    def _open(self, run_settings: Mapping[str, Any]) -> None:
        for leftover in self.cache_dir.glob("*.tmp"):  # from an interrupted run: never a complete file
            leftover.unlink()
        self.runs: list[dict[str, Any]] = self._previous_runs()
        if dict(run_settings) not in self.runs:
            self.runs.append(dict(run_settings))
        self.tensor_specs: dict[str, Any] = {}  # name -> {"shape", "dtype"} of one record (no batch dim)
        self.shards: list[dict[str, Any]] = []  # manifest entries {"file", "num_records"}
        self.cached_keys: set[str] = set()
        self._pending_records: list[RecordInfo] = []
        self._pending_tensors: list[dict[str, Tensor]] = []
        self._pending_keys: set[str] = set()
        self._adopt_existing_shards()

    def _previous_runs(self) -> list[dict[str, Any]]:
        manifest_path = self.cache_dir / MANIFEST_NAME
        if not manifest_path.is_file():
            return []
        try:
            manifest = json.loads(manifest_path.read_text())
            old_layout = CacheLayout(**manifest["layout"])
        except Exception as error:  # rebuilt from the shards below
            logger.warning("%s is unreadable (%s); rebuilding it from the shard files", manifest_path, error)
            return []
        self._check_layout(old_layout, manifest_path)
        return list(manifest.get("runs", []))

    def _check_layout(self, found: CacheLayout, where: Path) -> None:
        if found != self.layout:
            differences = ", ".join(
                f"{name}={value!r} (asked {getattr(self.layout, name)!r})"
                for name, value in asdict(found).items()
                if getattr(self.layout, name) != value
            )
            raise CacheError(
                f"{where} was prepared with {differences}; prepare into a new out_dir, or use the cached settings"
            )

    def _adopt_existing_shards(self) -> None:
        for path in sorted(self.cache_dir.glob(SHARD_GLOB)):
            try:
                shard = read_shard(path)
            except CacheError as error:
                corrupt = path.with_name(path.name + ".corrupt")
                os.replace(path, corrupt)
                logger.warning("%s; moved it to %s, its records will be encoded again", error, corrupt)
                continue
            self._check_layout(shard.layout, path)
            self._check_or_set_specs(shard.tensors, f"shard {path}")
            self.shards.append({"file": path.name, "num_records": len(shard.records)})
            self.cached_keys.update(record.key for record in shard.records)
        uncond_path = self.cache_dir / UNCOND_NAME
        if uncond_path.is_file():
            try:
                uncond = load_file(str(uncond_path))
            except Exception as error:
                logger.warning("%s is unreadable (%s); it will be encoded again", uncond_path, error)
                uncond_path.unlink()
            else:
                self._check_or_set_specs(uncond, str(uncond_path))

    def _check_or_set_specs(self, batched_tensors: Mapping[str, Tensor], where: str) -> None:
        known = {name: spec for name, spec in self.tensor_specs.items() if name in batched_tensors}
        check_shapes({name: batched_tensors[name] for name in known}, known, where, batched=True)
        for name, tensor in batched_tensors.items():
            self.tensor_specs.setdefault(name, tensor_spec(tensor, batched=True))

    def has(self, key: str) -> bool:
        """Whether a record with this content key is cached (or buffered by this writer, or known elsewhere)."""
        return key in self.cached_keys or key in self._pending_keys or key in self.known_keys

    def adopt_shard(self, path: Path) -> None:
        """Take in a whole shard file of another cache with the same layout (a multi-process run's part): renamed
        into this cache when none of its records is here yet, else its new records are added one by one."""
        shard = read_shard(path)
        self._check_layout(shard.layout, path)
        self._check_or_set_specs(shard.tensors, f"shard {path}")
        if not any(self.has(record.key) for record in shard.records):
            self.flush()
            target = self.cache_dir / f"shard-{self._next_shard_index():05d}.safetensors"
            os.replace(path, target)  # one rename on one file system: the shard is in one place or the other
            self.shards.append({"file": target.name, "num_records": len(shard.records)})
            self.cached_keys.update(record.key for record in shard.records)
            self.write_manifest()
            return
        for index, record in enumerate(shard.records):
            self.add(record, {name: tensor[index] for name, tensor in shard.tensors.items()})
        self.flush()
        path.unlink()

    @property
    def has_uncond(self) -> bool:
        return (self.cache_dir / UNCOND_NAME).is_file()

    def write_uncond(self, text_tensors: Mapping[str, Tensor]) -> None:
        """Store the empty prompt's text tensors (batch dim 1)."""
        tensors = {name: tensor.detach().cpu() for name, tensor in text_tensors.items()}
        self._check_or_set_specs(tensors, str(self.cache_dir / UNCOND_NAME))
        _atomic_save(tensors, self.cache_dir / UNCOND_NAME)

    def add(self, record: RecordInfo, tensors: Mapping[str, Tensor]) -> None:
        """Buffer one record (tensors without batch dim); writes a shard when ``records_per_shard`` are buffered.
        Raises :class:`CacheError` if its shapes differ from the cache's."""
        if self.has(record.key):
            return
        single = {name: tensor.detach().cpu().unsqueeze(0) for name, tensor in tensors.items()}
        self._check_or_set_specs(single, f"record from {record.source!r}")
        if set(single) != set(self.tensor_specs):
            raise CacheError(
                f"record from {record.source!r} has tensors {sorted(single)}, expected {sorted(self.tensor_specs)}"
            )
        self._pending_records.append(record)
        self._pending_tensors.append({name: tensor[0] for name, tensor in single.items()})
        self._pending_keys.add(record.key)
        if len(self._pending_records) >= self.records_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write buffered records as one new shard, then the manifest (both atomically)."""
        if not self._pending_records:
            return
        names = sorted(self.tensor_specs)
        stacked = {name: torch.stack([record[name] for record in self._pending_tensors]) for name in names}
        path = self.cache_dir / f"shard-{self._next_shard_index():05d}.safetensors"
        _atomic_save(stacked, path, metadata=shard_metadata(self.layout, self._pending_records))
        self.shards.append({"file": path.name, "num_records": len(self._pending_records)})
        self.cached_keys.update(record.key for record in self._pending_records)
        self._pending_records, self._pending_tensors, self._pending_keys = [], [], set()
        self.write_manifest()

    def _next_shard_index(self) -> int:
        numbers = (re.match(r"shard-(\d+)\.safetensors", path.name) for path in self.cache_dir.iterdir())
        used = [int(match.group(1)) for match in numbers if match]
        return max(used, default=-1) + 1

    def write_manifest(self) -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "layout": asdict(self.layout),
            "num_records": sum(entry["num_records"] for entry in self.shards),
            "tensors": self.tensor_specs,
            "latent_encoding": LATENT_ENCODING,
            "uncond": UNCOND_NAME,
            "shards": self.shards,
            "runs": self.runs,
        }
        write_bytes_atomic(self.cache_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode(), what="cache manifest")

    @property
    def num_records(self) -> int:
        return len(self.cached_keys) + len(self._pending_records)

    def close(self) -> None:
        try:
            self.flush()
            self.write_manifest()
        finally:
            self._lock.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
