"""A user's data set from a ``.npz`` archive, validated with one-line errors that name the file and the fix.

Expected contents (write it with ``numpy.savez(path, x=samples, y=labels)``):

* ``x``: the samples, numeric (integers, floats or bools), finite, at least 2 of them:

  - ``(N, D)``: vectors;
  - ``(N, H, W)``: single-channel images (a channel axis is added: ``(N, 1, H, W)``);
  - ``(N, C, H, W)``: images, channels first;
  - ``(N, H, W, C)``: images, channels last, recognised **only** when ``C = x.shape[3]`` is 1, 3 or 4 and
    ``x.shape[1]`` is not (otherwise the array is read as channels first). It is transposed to channels first.

* ``y`` (optional): integer class labels ``(N,)``, all ``>= 0``; the number of classes is ``max(y) + 1``.

Arrays are always read with ``allow_pickle=False``: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

#: Channel counts that mark the last axis of a 4-D ``x`` as a channel axis (grey, RGB, RGBA).
CHANNELS_LAST_SIZES = (1, 3, 4)

_NUMERIC_HINT = {"x": "float32", "y": "int64"}
_SAVE_HINT = "save it with numpy.savez(path, x=samples, y=labels)"


@dataclass
class NpzData:
    """The validated arrays of one ``.npz`` file, still in data space (dtype as stored)."""

    x: np.ndarray
    """(N, D) vectors or (N, C, H, W) images (channels first), numeric dtype as stored in the file."""
    y: np.ndarray | None
    """(N,) int64 labels >= 0, or None when the file has no ``y``."""
    kind: str
    """"vector" or "image"."""
    path: Path
    channels_last: bool = False
    """True when ``x`` was stored as (N, H, W, C) and was transposed to channels first."""


def _read_array(archive, name: str, path: Path) -> np.ndarray:
    try:
        array = archive[name]
        if not isinstance(array, np.ndarray):  # a zip member that is not in .npy format comes back as bytes
            raise ValueError("the member is not in .npy format")
        return array
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise DataError(
                f"{path}: array '{name}' holds Python objects (dtype=object), which are never unpickled; "
                f"store a numeric array instead, e.g. {name}=np.asarray({name}, dtype=np.{_NUMERIC_HINT[name]})"
            ) from None
        raise DataError(f"{path}: array '{name}' cannot be read ({err}); {_SAVE_HINT}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: array '{name}' is corrupted ({err}); write the file again") from None


def _open(path: Path):
    if not path.exists():
        raise DataError(f"{path}: data file not found; pass the path of an existing .npz file with an array 'x'")
    if not path.is_file():
        raise DataError(f"{path}: is not a file; pass the path of a .npz file with an array 'x'")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            is_npy = handle.read(6) == b"\x93NUMPY"
        what = "a single .npy array, not an .npz archive of named arrays" if is_npy else "not a zip file"
        raise DataError(f"{path}: not a valid .npz archive ({what}); {_SAVE_HINT}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a valid .npz archive ({type(err).__name__}: {err}); {_SAVE_HINT}") from None


def _check_x(x: np.ndarray, path: Path) -> tuple[np.ndarray, str, bool]:
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
        raise DataError(
            f"{path}: array 'x' has non-numeric dtype {x.dtype}; store integers or floats, "
            "e.g. x=np.asarray(x, dtype=np.float32)"
        )
    if x.ndim not in (2, 3, 4):
        raise DataError(
            f"{path}: array 'x' has shape {x.shape} ({x.ndim} dims); expected (N, D) vectors or "
            "(N, H, W), (N, C, H, W) or (N, H, W, C) images"
        )
    if x.shape[0] < 2:
        raise DataError(
            f"{path}: array 'x' holds {x.shape[0]} sample(s); at least 2 are needed (training and held-out split)"
        )
    if 0 in x.shape:
        raise DataError(f"{path}: array 'x' has shape {x.shape} with a zero-size axis; each sample must hold values")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        num_bad = int(bad.sum())
        if num_bad:
            first = np.unravel_index(int(bad.argmax()), x.shape)
            raise DataError(
                f"{path}: array 'x' has {num_bad} non-finite value(s) (NaN or inf), the first at x[{', '.join(map(str, first))}]; "
                "remove or replace those samples"
            )
        limit = float(np.finfo(np.float32).max)
        too_large = np.abs(x) > limit if x.dtype.itemsize > 4 else np.zeros((), bool)
        if too_large.any():  # training runs in float32: these would become inf
            first = np.unravel_index(int(too_large.argmax()), x.shape)
            raise DataError(
                f"{path}: array 'x' has {int(too_large.sum())} value(s) beyond float32's range (|x| > {limit:.3g}), the "
                f"first at x[{', '.join(map(str, first))}]; rescale the data"
            )
    if x.ndim == 2:
        return x, "vector", False
    if x.ndim == 3:
        return x[:, None], "image", False
    channels_last = x.shape[3] in CHANNELS_LAST_SIZES and x.shape[1] not in CHANNELS_LAST_SIZES
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x, "image", channels_last


def _check_y(y: np.ndarray, num_samples: int, path: Path) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: array 'y' has dtype {y.dtype}; class labels must be integers 0..K-1, e.g. y=y.astype(np.int64)"
        )
    if y.ndim != 1 or y.shape[0] != num_samples:
        raise DataError(
            f"{path}: array 'y' has shape {y.shape} but 'x' holds {num_samples} samples; "
            f"store one label per sample, shape ({num_samples},)"
        )
    negative = y < 0
    if negative.any():
        raise DataError(
            f"{path}: array 'y' has {int(negative.sum())} negative label(s), the first at y[{int(negative.argmax())}]; "
            "labels must be 0..K-1"
        )
    return y.astype(np.int64)


def load_npz(path: str | Path) -> NpzData:
    """Read and validate ``x`` (and optional ``y``) from a ``.npz`` file. Raises :class:`DataError`."""
    path = Path(path)
    with _open(path) as archive:
        names = list(archive.files)
        if "x" not in names:
            found = ", ".join(repr(n) for n in names) or "none"
            raise DataError(
                f"{path}: no array 'x' (arrays found: {found}); store the samples under the name x, "
                "e.g. numpy.savez(path, x=samples, y=labels)"
            )
        x = _read_array(archive, "x", path)
        y = _read_array(archive, "y", path) if "y" in names else None
    x, kind, channels_last = _check_x(x, path)
    if y is not None:
        y = _check_y(y, x.shape[0], path)
    return NpzData(x=x, y=y, kind=kind, path=path, channels_last=channels_last)
