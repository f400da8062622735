"""Aspect-ratio buckets: one cache per resolution of about the same pixel count, and batches from one bucket.

``prepare --images DIR --buckets`` puts each image in the bucket whose aspect ratio is nearest its own (crop
and resize to that bucket's size, so little of the picture is lost) and writes one ordinary cache per bucket,
``OUT/bucket-<H>x<W>/``, plus ``OUT/buckets.json``. Training on ``OUT`` draws every batch from one bucket (a
tensor batch needs one shape): the trainer draws indices uniformly over all records, the first index picks the
bucket (so a bucket is chosen in proportion to its size) and the others are taken modulo that bucket's size.

Bucket sizes keep the target area ``height * width`` within a pixel multiple of the VAE and patching and
aspect ratios from 1:2 to 2:1 (the convention of SimpleTuner and kohya's sd-scripts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_json_atomic
from .cache import CacheError, LatentCache, RecordInfo

BUCKETS_NAME = "buckets.json"
MAX_ASPECT = 2.0


def bucket_sizes(height: int, width: int, multiple: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(H, W) sizes with about ``height * width`` pixels, both multiples of ``multiple``, aspect in [1/max, max]."""
    area = height * width
    sizes = set()
    side = multiple
    while side <= math.sqrt(area * max_aspect) + multiple:
        other = max(multiple, round(area / side / multiple) * multiple)
        for h, w in ((side, other), (other, side)):
            if 1 / max_aspect <= w / h <= max_aspect:
                sizes.add((h, w))
        side += multiple
    return sorted(sizes, key=lambda s: s[1] / s[0])


def nearest_bucket(image_height: int, image_width: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio; ties: the larger area)."""
    ratio = math.log(image_width / image_height)
    return min(sizes, key=lambda s: (abs(math.log(s[1] / s[0]) - ratio), -s[0] * s[1]))


def bucket_dir_name(height: int, width: int) -> str:
    return f"bucket-{height}x{width}"


def write_bucket_index(out_dir: Path, sizes: list[tuple[int, int]]) -> None:
    write_json_atomic(Path(out_dir) / BUCKETS_NAME, {"buckets": [bucket_dir_name(h, w) for h, w in sizes]},
                      what="bucket index")


class BucketedCache:
    """The buckets of ``OUT`` as one data source; the same interface the trainer uses of :class:`LatentCache`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = json.loads((self.path / BUCKETS_NAME).read_text())
        names = [name for name in index.get("buckets", []) if (self.path / name).is_dir()]
        if not names:
            raise CacheError(f"{self.path / BUCKETS_NAME} names no bucket folder; run `shortcutfm prepare --buckets`")
        self.buckets = [LatentCache(self.path / name) for name in names]
        first = self.buckets[0].layout
        for bucket in self.buckets[1:]:
            layout = bucket.layout
            if (layout.family, layout.model_id, layout.max_sequence_length) != (first.family, first.model_id,
                                                                                 first.max_sequence_length):
                raise CacheError(f"{bucket.path} was prepared with another model or text length than {self.buckets[0].path}")
        self.layout = first  # family, model and text length are shared; height/width are the first bucket's
        self.uncond = self.buckets[0].uncond
        self.records: list[RecordInfo] = [r for bucket in self.buckets for r in bucket.records]
        self._starts = torch.tensor([0] + [len(b) for b in self.buckets]).cumsum(0)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def keys(self) -> list[str]:
        return [record.key for record in self.records]

    def bucket_of(self, index: int) -> int:
        return int(torch.searchsorted(self._starts, torch.tensor(index % len(self)), right=True)) - 1

    def get(self, indices: Tensor) -> dict[str, Tensor]:
        """One bucket's records: ``indices[0]`` picks the bucket, every index is then taken modulo its size."""
        indices = torch.as_tensor(indices).long()
        if indices.ndim != 1 or not len(indices):
            raise ValueError("indices must be a non-empty 1-D integer tensor")
        which = self.bucket_of(int(indices[0]))
        start, bucket = int(self._starts[which]), self.buckets[which]
        return bucket.get((indices - start) % len(bucket))

    def mean_image_tokens(self, tokens_of) -> int:
        """Records-weighted mean of ``tokens_of(latent_height, latent_width)`` (the dynamic shift's input)."""
        total = sum(len(b) * tokens_of(*b.get(torch.arange(1))["latents"].shape[-2:]) for b in self.buckets)
        return round(total / len(self))


def open_cache(path: str | Path) -> LatentCache | BucketedCache:
    """A prepared cache folder: a bucketed one (with ``buckets.json``) or a single-resolution one."""
    path = Path(path)
    return BucketedCache(path) if (path / BUCKETS_NAME).is_file() else LatentCache(path)
