"""Training data: 2D toys, scikit-learn's 8x8 digits and users' .npz files, normalised to model space.

Entry point: :func:`load_dataset` -> :class:`DataSplit` (``train`` and ``holdout`` :class:`ArrayDataset`).
"""

from .dataset import ArrayDataset, DataSplit, Normalization, image_value_range, load_dataset, split_indices
from .digits import DIGITS_VALUE_RANGE, load_digits_arrays
from .errors import DataError
from .npz import NpzData, load_npz
from .toys import TOY_DATASETS, checkerboard, eight_gaussians, moons, rings, spirals

__all__ = [
    "ArrayDataset", "DataSplit", "Normalization", "image_value_range", "load_dataset", "split_indices",
    "DIGITS_VALUE_RANGE", "load_digits_arrays",
    "DataError",
    "NpzData", "load_npz",
    "TOY_DATASETS", "checkerboard", "eight_gaussians", "moons", "rings", "spirals",
]
