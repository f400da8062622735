"""Training data in model space: :class:`ArrayDataset`, its :class:`Normalization`, and :func:`load_dataset`.

Model space is what the flow model sees (and what the sampler returns); data space is the user's units.
The map between them is affine and stored with the data set, ``data = model * scale + shift``:

* toys (``mode="identity"``): kept as they are; they are already zero-mean with unit scale.
* images (``mode="range"``): one value range ``[lo, hi]`` for all pixels is mapped to ``[-1, 1]``. The range is
  (0, 255) for uint8; (0, 1) for bools and for float data already within [0, 1]; (-1, 1) for float data already
  within [-1, 1] that has negative values; (0, 16) for the digits; otherwise the training split's own min/max.
* vectors (``mode="standardize"``): per dimension, ``(x - mean) / std`` with the training split's mean and std
  (a constant dimension keeps std 1).

The held-out split always uses the training split's normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .digits import DIGITS_VALUE_RANGE, load_digits_arrays
from .errors import DataError
from .npz import load_npz
from .toys import TOY_DATASETS

KINDS = ("vector", "image")
NORMALIZATION_MODES = ("identity", "standardize", "range")


@dataclass
class Normalization:
    """Affine map between model space and data space: ``data = model * scale + shift``.

    ``shift`` and ``scale`` broadcast against a batch ``(B, *sample_shape)``: shape ``(D,)`` for standardised
    vectors, ``()`` otherwise.
    """

    mode: str
    """"identity", "standardize" (per-dimension mean/std) or "range" (value range -> [-1, 1])."""
    shift: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization.mode must be one of {NORMALIZATION_MODES}, got {self.mode!r}")
        self.shift = torch.as_tensor(self.shift, dtype=torch.float32)
        self.scale = torch.as_tensor(self.scale, dtype=torch.float32)
        if not bool((self.scale > 0).all()):
            raise ValueError("normalization.scale must be > 0 everywhere")

    @classmethod
    def identity(cls) -> Normalization:
        return cls("identity", torch.tensor(0.0), torch.tensor(1.0))

    @classmethod
    def from_value_range(cls, low: float, high: float) -> Normalization:
        """Map data values in ``[low, high]`` to ``[-1, 1]``."""
        if not high > low:
            raise DataError(f"value range must have high > low, got [{low}, {high}] (are all values equal?)")
        return cls("range", torch.tensor((high + low) / 2.0), torch.tensor((high - low) / 2.0))

    @classmethod
    def from_statistics(cls, x: torch.Tensor) -> Normalization:
        """Per-dimension standardisation fitted on ``x`` (N, D); constant dimensions keep std 1."""
        x64 = x.double()
        if len(x64) < 2:  # one sample has no spread: every dimension keeps std 1
            return cls("standardize", x64.mean(dim=0), torch.ones(x64.shape[1:], dtype=torch.float64))
        std = x64.std(dim=0)
        std = torch.where(std > 1e-12 * (1.0 + x64.abs().amax(dim=0)), std, torch.ones_like(std))
        return cls("standardize", x64.mean(dim=0), std)

    def to_data_space(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> data space; ``x`` is (B, *sample_shape), on any device."""
        return x * self.scale.to(x.device, x.dtype) + self.shift.to(x.device, x.dtype)

    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Data space -> model space; the inverse of :meth:`to_data_space`."""
        return (x - self.shift.to(x.device, x.dtype)) / self.scale.to(x.device, x.dtype)

    def to_dict(self) -> dict:
        """JSON-friendly form (for checkpoints); :meth:`from_dict` restores it."""
        return {"mode": self.mode, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> Normalization:
        return cls(state["mode"], torch.tensor(state["shift"]), torch.tensor(state["scale"]))


@dataclass
class ArrayDataset:
    """One split of a data set, normalised to model space."""

    x: torch.Tensor
    """(N, D) vectors or (N, C, H, W) images, float32, model space."""
    y: torch.Tensor | None
    """(N,) int64 class labels in 0..num_classes-1, or None."""
    num_classes: int
    """Number of classes (0 when unlabelled)."""
    kind: str
    """"vector" or "image"."""
    name: str
    normalization: Normalization

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.x.dtype != torch.float32 or self.x.ndim != (2 if self.kind == "vector" else 4):
            raise ValueError(f"x of a {self.kind} data set must be float32 (N, {'D' if self.kind == 'vector' else 'C, H, W'}), "
                             f"got {self.x.dtype} {tuple(self.x.shape)}")
        if (self.y is None) != (self.num_classes == 0):
            raise ValueError("y and num_classes disagree: give labels with num_classes > 0, or y=None with 0")
        if self.y is not None and (self.y.dtype != torch.int64 or self.y.shape != self.x.shape[:1]):
            raise ValueError(f"y must be int64 of shape ({len(self.x)},), got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(D,)`` or ``(C, H, W)``."""
        return tuple(self.x.shape[1:])

    def to_data_space(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples (B, *sample_shape) (e.g. from the sampler) -> the user's units."""
        return self.normalization.to_data_space(x)

    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalization.to_model_space(x)


@dataclass
class DataSplit:
    """Training and held-out splits; both share the training split's normalisation."""

    train: ArrayDataset
    holdout: ArrayDataset


def image_value_range(x: np.ndarray) -> tuple[float, float]:
    """The value range of images ``x`` that is mapped to [-1, 1] (rules in the module docstring)."""
    if x.dtype == np.uint8:
        return 0.0, 255.0
    if x.dtype == np.bool_:
        return 0.0, 1.0
    low, high = float(x.min()), float(x.max())
    if np.issubdtype(x.dtype, np.floating) and -1.0 <= low and high <= 1.0:
        return (0.0, 1.0) if low >= 0.0 else (-1.0, 1.0)
    return low, high


def split_indices(
    num_samples: int, holdout_fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (by ``seed``) train / held-out indices, stratified by ``labels`` when given.

    Each class with at least 2 samples puts ``round(fraction * count)`` of them (at least 1, at most count - 1)
    into the held-out split. Both index arrays are sorted and non-empty (needs ``num_samples >= 2``).
    """
    generator = torch.Generator().manual_seed(seed)
    groups = [np.arange(num_samples)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train, holdout = [], []
    for group in groups:
        order = group[torch.randperm(len(group), generator=generator).numpy()]
        count = int(round(holdout_fraction * len(group)))
        count = min(max(count, 1), len(group) - 1) if len(group) >= 2 else 0
        holdout.append(order[:count])
        train.append(order[count:])
    train_idx, holdout_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(holdout))
    if len(holdout_idx) == 0:  # only singleton classes: move one sample over
        train_idx, holdout_idx = train_idx[:-1], train_idx[-1:]
    return train_idx, holdout_idx


def _labelled_split(name: str, source: str, x: np.ndarray, y: np.ndarray | None, kind: str,
                    holdout_fraction: float, seed: int, value_range: tuple[float, float] | None = None) -> DataSplit:
    train_idx, holdout_idx = split_indices(len(x), holdout_fraction, seed, y)
    x_train = torch.from_numpy(np.asarray(x[train_idx], dtype=np.float32))
    if kind == "image":
        low, high = value_range or image_value_range(x[train_idx])
        try:
            normalization = Normalization.from_value_range(low, high)
        except DataError:
            raise DataError(
                f"{source}: all training pixel values equal {low}; images need some contrast (is x all one value?)"
            ) from None
    else:
        normalization = Normalization.from_statistics(x_train)
    num_classes = 0 if y is None else int(y.max()) + 1

    def build(idx: np.ndarray, x_raw: torch.Tensor) -> ArrayDataset:
        labels = None if y is None else torch.from_numpy(y[idx].astype(np.int64))
        return ArrayDataset(normalization.to_model_space(x_raw).contiguous(), labels, num_classes, kind, name,
                            normalization)

    x_holdout = torch.from_numpy(np.asarray(x[holdout_idx], dtype=np.float32))
    return DataSplit(train=build(train_idx, x_train), holdout=build(holdout_idx, x_holdout))


def load_dataset(
    source: str | Path,
    *,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    num_toy_samples: int = 100_000,
    num_toy_holdout: int = 20_000,
) -> DataSplit:
    """Load a data set as training and held-out splits in model space.

    Args:
        source: a toy name (see :data:`TOY_DATASETS`), ``"digits"``, or the path of a ``.npz`` file
            (see :mod:`shortcutfm.data.npz`).
        holdout_fraction: share of the samples held out (digits and .npz; stratified by label when labelled).
        seed: the split (digits, .npz) or the toy samples depend only on this. Toys draw the training set with
            generator seed ``2 * seed`` and the held-out set with ``2 * seed + 1``, so no two streams coincide.
        num_toy_samples: training samples drawn for a toy.
        num_toy_holdout: held-out samples drawn for a toy (fresh samples, not a split).
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    source_name = str(source)
    if source_name in TOY_DATASETS:
        if num_toy_samples < 2 or num_toy_holdout < 2:
            raise ValueError(f"num_toy_samples and num_toy_holdout must be >= 2, got {num_toy_samples}, {num_toy_holdout}")
        sampler = TOY_DATASETS[source_name]
        identity = Normalization.identity()
        train, holdout = (
            ArrayDataset(sampler(n, torch.Generator().manual_seed(2 * seed + k)), None, 0, "vector", source_name, identity)
            for k, n in ((0, num_toy_samples), (1, num_toy_holdout))
        )
        return DataSplit(train=train, holdout=holdout)
    if source_name == "digits":
        images, labels = load_digits_arrays()
        return _labelled_split("digits", "digits", images, labels, "image", holdout_fraction, seed, DIGITS_VALUE_RANGE)
    if source_name.endswith(".npz"):
        data = load_npz(source_name)
        return _labelled_split(data.path.stem, str(data.path), data.x, data.y, data.kind, holdout_fraction, seed)
    valid = ", ".join([*TOY_DATASETS, "digits"])
    raise DataError(
        f"unknown data source {source_name!r}: use one of {valid}, or the path of an existing .npz file "
        "(the path must end in .npz)"
    )
