"""Data preparation on several processes (``torchrun`` / ``accelerate launch`` of ``shortcutfm prepare``).

Rank ``r`` of ``W`` takes every ``W``-th input (prompt sample or image, in file order, from position ``r``) and
fills its own part cache ``OUT/parts/rank-<r>/`` (an ordinary cache with its own lock), skipping records that
``OUT`` already holds. When every rank is done, rank 0 merges the parts into ``OUT``: each part shard is renamed
into ``OUT`` whole (or, if some of its records are already there, its new records are copied), then the part is
removed. Every step is a rename or an atomic write, so a killed run (any rank, also during the merge) leaves
whole shards in ``OUT`` or in a part; running the same command again encodes only what is missing and merges.
Records are content-keyed, so the merged cache holds each record once, whatever the split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from .cache import MANIFEST_NAME, SHARD_GLOB, UNCOND_NAME, read_manifest, read_shard
from .writer import CacheWriter

PARTS_DIR = "parts"


def part_dir(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"rank-{rank:03d}"


def held_keys(cache_dir: str | Path) -> set[str]:
    """Content keys of the records in ``cache_dir``'s shards (read from the shard metadata only)."""
    keys: set[str] = set()
    for path in sorted(Path(cache_dir).glob(SHARD_GLOB)):
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys.update(record["key"] for record in json.loads((handle.metadata() or {})["records"]))
        except Exception:  # an unreadable shard holds nothing usable; the writer will set it aside
            continue
    return keys


def merge_parts(out_dir: str | Path) -> int:
    """Merge every part cache under ``OUT/parts`` into ``OUT``; returns the records ``OUT`` then holds."""
    out_dir = Path(out_dir)
    parts = sorted((out_dir / PARTS_DIR).glob("rank-*"))
    shards = [shard for part in parts for shard in sorted(part.glob(SHARD_GLOB))]
    if shards:
        layout = read_shard(shards[0]).layout
        manifests = [part / MANIFEST_NAME for part in parts if (part / MANIFEST_NAME).is_file()]
        runs = (read_manifest(manifests[0].parent).get("runs") if manifests else None) or [{"source": "parts"}]
        with CacheWriter(out_dir, layout, runs[-1]) as writer:
            for part in parts:
                uncond = part / UNCOND_NAME
                if uncond.is_file() and not writer.has_uncond:
                    writer.write_uncond(load_file(str(uncond)))
            for shard in shards:
                writer.adopt_shard(shard)
    for part in parts:  # every shard is in OUT now: what is left is locks, manifests and empty parts
        shutil.rmtree(part)
    parts_root = out_dir / PARTS_DIR
    if parts_root.is_dir() and not any(parts_root.iterdir()):
        parts_root.rmdir()
    return len(held_keys(out_dir))
