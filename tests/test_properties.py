"""Property-based tests (hypothesis) of the two inputs users write by hand: config overrides and .npz files.

Whatever they hold, loading either succeeds with a valid result or fails with the module's one-line error type
(ConfigError, DataError), never with another exception."""

from __future__ import annotations

import math
import string
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shortcutfm.config import Config, ConfigError, load_config, save_config, to_dict
from shortcutfm.data import DataError, load_dataset

FIELDS = [f"{section}.{name}" for section, values in to_dict(Config()).items() for name in values]
yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.printable, max_size=12), st.sampled_from(["[1, 2]", "{a: 1}", "1e-3", ".nan", "-.inf", "[]", "''"]),
)
key_parts = st.one_of(st.sampled_from(FIELDS), st.text(string.ascii_lowercase + "._", min_size=1, max_size=16))


def override(key: str, value) -> str:
    return f"{key}={value}" if isinstance(value, str) else f"{key}={value!r}".replace("None", "null")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(key_parts, yaml_scalars), max_size=4))
def test_any_override_loads_a_valid_config_or_raises_config_error(pairs):
    overrides = [override(key, value) for key, value in pairs]
    try:
        config = load_config(None, overrides)
    except ConfigError as error:
        assert str(error) and "\n" not in str(error).strip()
        return
    # a loaded config holds only finite numbers and round-trips through its YAML file unchanged
    for section in to_dict(config).values():
        for value in section.values():
            for item in value if isinstance(value, list) else [value]:
                assert not (isinstance(item, float) and not math.isfinite(item)), (overrides, section)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        save_config(config, path)
        assert load_config(path) == config


dtypes = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes(),
                   hnp.complex_number_dtypes(), hnp.datetime64_dtypes(), hnp.unicode_string_dtypes())
shapes = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)


@st.composite
def npz_contents(draw):
    dtype = draw(dtypes)
    elements = None
    if dtype.kind == "f" and dtype.itemsize == 8:  # reach float64's whole range, beyond float32's
        elements = st.floats(width=64, allow_nan=True, allow_infinity=True)
    x = draw(hnp.arrays(dtype, shapes, elements=elements))
    contents = {"x": x}
    if draw(st.booleans()):
        n = x.shape[0] if x.ndim else 1
        length = draw(st.sampled_from([n, max(n - 1, 0), n + 1]))
        contents["y"] = draw(hnp.arrays(st.one_of(hnp.integer_dtypes(), hnp.floating_dtypes()), (length,)))
    if draw(st.booleans()):
        contents = {("X" if name == "x" else name): value for name, value in contents.items()}
    return contents


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(npz_contents())
@example({"x": np.array([[1e300], [0.0], [1.0]])})  # finite in float64, inf in float32 (found by hand)
@example({"x": np.zeros((3, 2)), "y": np.array([0, 1])})
@example({"x": np.full((4, 2, 2), 7, np.uint8)})
def test_any_npz_loads_finite_model_space_data_or_raises_data_error(contents):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "data.npz"
        np.savez(path, **contents)
        try:
            split = load_dataset(path)
        except DataError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            return
    for part in (split.train, split.holdout):
        assert len(part) >= 1 and part.x.dtype == torch.float32 and torch.isfinite(part.x).all()
        if part.y is not None:
            assert part.y.dtype == torch.int64 and (part.y >= 0).all() and len(part.y) == len(part.x)
            assert int(part.y.max()) < part.num_classes
