"""Data: toys, digits, .npz validation (one error per bad file), normalisation and splits."""

import numpy as np
import pytest
import torch

import shortcutfm.data as data
from shortcutfm.data import (
    TOY_DATASETS,
    ArrayDataset,
    DataError,
    Normalization,
    load_dataset,
    load_digits_arrays,
    load_npz,
    split_indices,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_public_api_imports():
    for name in data.__all__:
        assert getattr(data, name) is not None, name


# ---------------------------------------------------------------- toys


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_shape_determinism_and_scale(name):
    sampler = TOY_DATASETS[name]
    x = sampler(20_000, gen(0))
    assert x.shape == (20_000, 2) and x.dtype == torch.float32
    assert torch.equal(x, sampler(20_000, gen(0)))
    assert not torch.equal(x, sampler(20_000, gen(1)))
    assert x.mean(0).abs().max() < 0.05
    assert 0.6 < float(x.std(0).min()) and float(x.std(0).max()) < 1.5
    with pytest.raises(ValueError, match="n"):
        sampler(0, gen(0))


def test_toy_geometry():
    board = TOY_DATASETS["checkerboard"](10_000, gen(0))
    assert board.abs().max() <= 2.0
    assert torch.all((torch.floor(board[:, 0]) + torch.floor(board[:, 1])) % 2 == 0)  # black squares only
    radius = TOY_DATASETS["8gaussians"](10_000, gen(0)).norm(dim=1)
    assert abs(float(radius.mean()) - 2.0) < 0.02
    rings = TOY_DATASETS["rings"](10_000, gen(0)).norm(dim=1)
    assert torch.all((rings - 0.5 * torch.round(rings / 0.5)).abs() < 0.3)


def test_toy_load_dataset_uses_separate_streams():
    split = load_dataset("moons", num_toy_samples=1000, num_toy_holdout=500, seed=3)
    assert split.train.x.shape == (1000, 2) and split.holdout.x.shape == (500, 2)
    assert split.train.kind == "vector" and split.train.num_classes == 0 and split.train.y is None
    assert split.train.normalization.mode == "identity"
    assert torch.equal(split.train.x, TOY_DATASETS["moons"](1000, gen(6)))
    assert torch.equal(split.holdout.x, TOY_DATASETS["moons"](500, gen(7)))
    assert torch.equal(split.train.to_data_space(split.train.x), split.train.x)


def test_unknown_source_lists_valid_names():
    with pytest.raises(DataError, match="checkerboard.*digits.*must end in .npz"):
        load_dataset("mnist")


# ---------------------------------------------------------------- digits


def test_digits_arrays_and_split():
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32 and labels.dtype == np.int64
    split = load_dataset("digits", seed=0)
    train, holdout = split.train, split.holdout
    assert len(train) + len(holdout) == 1797 and len(holdout) == pytest.approx(0.2 * 1797, abs=10)
    assert train.kind == "image" and train.sample_shape == (1, 8, 8) and train.num_classes == 10
    assert float(train.x.min()) == -1.0 and float(train.x.max()) == 1.0
    counts_train, counts_holdout = torch.bincount(train.y, minlength=10), torch.bincount(holdout.y, minlength=10)
    assert torch.all((counts_holdout.double() / (counts_train + counts_holdout) - 0.2).abs() < 0.01)  # stratified
    train_idx, holdout_idx = split_indices(1797, 0.2, 0, labels)
    assert torch.allclose(holdout.to_data_space(holdout.x), torch.from_numpy(images[holdout_idx]), atol=1e-5)
    assert torch.equal(train.y, torch.from_numpy(labels[train_idx]))
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.holdout.x, holdout.x)
    assert not torch.equal(load_dataset("digits", seed=1).holdout.y, holdout.y)


def test_split_indices_partition():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3])
    train, holdout = split_indices(len(labels), 0.2, 0, labels)
    assert sorted(np.concatenate([train, holdout]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[holdout], minlength=4).tolist() == [2, 1, 1, 0]
    train, holdout = split_indices(2, 0.2, 0)
    assert len(train) == 1 and len(holdout) == 1


# ---------------------------------------------------------------- .npz files: valid data


def test_npz_vectors_standardised_on_train_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[10.0, -3.0, 0.0], scale=[5.0, 0.1, 1.0], size=(500, 3))
    x[:, 2] = 7.0  # a constant dimension keeps std 1
    np.savez(tmp_path / "vec.npz", x=x)
    split = load_dataset(str(tmp_path / "vec.npz"), seed=0)
    train, holdout = split.train, split.holdout
    assert train.kind == "vector" and train.name == "vec" and train.y is None and train.num_classes == 0
    assert torch.allclose(train.x.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(train.x.std(0)[:2], torch.ones(2), atol=1e-3) and float(train.x[:, 2].abs().max()) == 0
    _, holdout_idx = split_indices(500, 0.2, 0)
    assert torch.allclose(holdout.to_data_space(holdout.x).double(), torch.from_numpy(x[holdout_idx]), rtol=1e-5, atol=1e-4)
    assert holdout.normalization is train.normalization


@pytest.mark.parametrize(
    "shape, layout, channels_last",
    [((20, 6, 5), "NHW", False), ((20, 3, 6, 5), "NCHW", False), ((20, 6, 5, 3), "NHWC", True),
     ((20, 4, 4, 3), "NCHW", False), ((20, 2, 7, 7), "NCHW", False)],
)
def test_npz_image_layouts(tmp_path, shape, layout, channels_last):
    x = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    x.reshape(-1)[:2] = (0, 255)
    np.savez(tmp_path / "img.npz", x=x, y=np.arange(20) % 2)
    loaded = load_npz(tmp_path / "img.npz")
    expected = x[:, None] if layout == "NHW" else x.transpose(0, 3, 1, 2) if layout == "NHWC" else x
    assert loaded.kind == "image" and loaded.channels_last == channels_last
    assert np.array_equal(loaded.x, expected)
    split = load_dataset(str(tmp_path / "img.npz"))
    assert split.train.sample_shape == expected.shape[1:] and split.train.num_classes == 2
    train_idx, _ = split_indices(20, 0.2, 0, np.arange(20) % 2)
    assert torch.allclose(split.train.x, torch.from_numpy(expected[train_idx] / 127.5 - 1.0).float(), atol=1e-6)


@pytest.mark.parametrize(
    "values, dtype, value_range",
    [((0.0, 0.5, 1.0), np.float32, (0.0, 1.0)), ((0.0, 0.2, 0.6), np.float64, (0.0, 1.0)),
     ((-0.5, 0.0, 0.5), np.float32, (-1.0, 1.0)), ((-3.0, 1.0, 5.0), np.float32, (-3.0, 5.0)),
     ((0, 1000, 4000), np.uint16, (0.0, 4000.0)), ((0, 1, 255), np.uint8, (0.0, 255.0)),
     ((False, True, True), np.bool_, (0.0, 1.0))],
)
def test_image_value_range_rules(values, dtype, value_range):
    assert data.image_value_range(np.array(values, dtype=dtype)) == value_range


def test_normalization_round_trip_and_serialisation():
    x = torch.randn(64, 5, generator=gen(0)) * 3 + 1
    norm = Normalization.from_statistics(x)
    assert torch.allclose(norm.to_data_space(norm.to_model_space(x)), x, atol=1e-5)
    restored = Normalization.from_dict(norm.to_dict())
    assert restored.mode == "standardize" and torch.equal(restored.scale, norm.scale)
    image_norm = Normalization.from_value_range(0.0, 16.0)
    assert image_norm.to_model_space(torch.tensor([0.0, 8.0, 16.0])).tolist() == [-1.0, 0.0, 1.0]


def test_array_dataset_validation():
    with pytest.raises(ValueError, match="kind"):
        ArrayDataset(torch.zeros(4, 2), None, 0, "audio", "t", Normalization.identity())
    with pytest.raises(ValueError, match="num_classes"):
        ArrayDataset(torch.zeros(4, 2), None, 3, "vector", "t", Normalization.identity())
    with pytest.raises(ValueError, match="float32"):
        ArrayDataset(torch.zeros(4, 2), None, 0, "image", "t", Normalization.identity())


# ---------------------------------------------------------------- .npz files: one error per bad file


def _write_bad(path, case):
    good = np.zeros((10, 3), dtype=np.float32)
    if case == "not_zip":
        path.write_text("hello, not a zip")
    elif case == "npy":
        with open(path, "wb") as handle:
            np.save(handle, good)
    elif case == "no_x":
        np.savez(path, images=good, labels=np.zeros(10, dtype=np.int64))
    elif case == "ndim5":
        np.savez(path, x=np.zeros((4, 1, 2, 2, 2)))
    elif case == "ndim1":
        np.savez(path, x=np.zeros(10))
    elif case == "one_sample":
        np.savez(path, x=np.zeros((1, 3)))
    elif case == "nan":
        bad = good.copy()
        bad[4, 1] = np.nan
        bad[7, 0] = np.inf
        np.savez(path, x=bad)
    elif case == "strings":
        np.savez(path, x=np.array([["a", "b"], ["c", "d"]]))
    elif case == "object":
        np.savez(path, x=np.array([[1, "a"], [2, None]], dtype=object))
    elif case == "y_float":
        np.savez(path, x=good, y=np.zeros(10, dtype=np.float32))
    elif case == "y_length":
        np.savez(path, x=good, y=np.zeros(9, dtype=np.int64))
    elif case == "y_negative":
        np.savez(path, x=good, y=np.array([0, 1, -1, 2, 0, 0, -3, 0, 0, 0]))
    elif case == "y_object":
        np.savez(path, x=good, y=np.array([None] * 10, dtype=object))
    elif case == "bad_member":
        import zipfile

        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", b"not an array")
    elif case == "constant":
        np.savez(path, x=np.full((10, 4, 4), 7.0))


BAD_FILES = [
    ("missing", "not found"),
    ("not_zip", "not a valid .npz archive \\(not a zip file\\)"),
    ("npy", "not a valid .npz archive \\(a single .npy array"),
    ("no_x", "no array 'x' \\(arrays found: 'images', 'labels'\\)"),
    ("ndim5", "5 dims"),
    ("ndim1", "1 dims"),
    ("one_sample", "holds 1 sample"),
    ("nan", "2 non-finite value\\(s\\).*first at x\\[4, 1\\]"),
    ("strings", "non-numeric dtype"),
    ("object", "Python objects"),
    ("y_float", "'y' has dtype float32.*integers"),
    ("y_length", "'y' has shape \\(9,\\).*10 samples"),
    ("y_negative", "2 negative label\\(s\\), the first at y\\[2\\]"),
    ("y_object", "'y' holds Python objects.*dtype=np.int64"),
    ("bad_member", "array 'x' cannot be read"),
    ("constant", "all training pixel values equal 7.0"),
]


@pytest.mark.parametrize("case, message", BAD_FILES, ids=[case for case, _ in BAD_FILES])
def test_npz_errors_name_the_file(tmp_path, case, message):
    path = tmp_path / f"bad_{case}.npz"
    if case != "missing":
        _write_bad(path, case)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(path))
    text = str(info.value)
    assert "\n" not in text
    assert f"bad_{case}" in text
