"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), shipped inside scikit-learn: no download."""

from __future__ import annotations

import numpy as np

#: Pixel values of the digits are integers in [0, 16] (counts of set pixels in 4x4 blocks of the 32x32 scans).
DIGITS_VALUE_RANGE = (0.0, 16.0)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits in data space: images (1797, 1, 8, 8) float32 in [0, 16] and labels (1797,) int64 in 0..9."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return images, labels
