"""_serial.py (helpers of io): JSON values round-trip, the safetensors table is validated."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab import _serial

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**62, 2**62) | st.floats() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.tuples(c, c)
    | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(json_values)
def test_json_values_round_trip(x):
    import json

    encoded = _serial.to_json(x, "meta")
    text = json.dumps(encoded, allow_nan=False)  # strict JSON: NaN/inf are encoded
    assert _same(_serial.from_json(json.loads(text)), x)


def test_numpy_scalars_and_dtypes_round_trip():
    for x, want in ((np.int8(3), 3), (np.float32(1.5), 1.5), (np.bool_(True), True)):
        assert _serial.from_json(_serial.to_json(x, "m")) == want
    assert _serial.from_json(_serial.to_json(np.dtype(np.float16), "m")) == jnp.float16
    assert _serial.from_json(_serial.to_json(np.dtype(jnp.bfloat16), "m")) == jnp.bfloat16


def test_non_json_values_raise_type_error_naming_where():
    with pytest.raises(TypeError, match="meta.x"):
        _serial.to_json({1: 2}, "meta.x")
    with pytest.raises(TypeError, match="object"):
        _serial.to_json(object(), "meta")


@given(st.lists(st.sampled_from(["float32", "int8", "bfloat16", "bool", "float64",
                                 "complex64"]), max_size=4),
       st.lists(st.integers(0, 3), min_size=1, max_size=3))
def test_safetensors_table_is_contiguous_and_checks(dtypes, shape):
    tensors = [(f"t{i}", np.zeros(shape, jnp.dtype(d))) for i, d in enumerate(dtypes)]
    header, blobs = _serial.safetensors_header(tensors)
    total = sum(b.nbytes for b in blobs)
    table = _serial.check_table(header, total)
    assert list(table) == [name for name, _ in tensors]
    for name, arr in tensors:
        code, tshape, begin, end = table[name]
        assert end - begin == arr.nbytes
        if code != "U8" or arr.dtype == np.uint8:  # known dtypes keep their shape
            assert tshape == arr.shape
    if tensors and total:
        with pytest.raises(ValueError, match="ends at byte"):
            _serial.check_table(header, total + 1)


def test_check_table_rejects_bad_entries():
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert _serial.check_table(good, 8)["a"] == ("F32", (2,), 0, 8)
    bad = [
        ({"a": {"dtype": "F32", "shape": [2]}}, "bad entry"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "do not fit"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "do not fit"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "not contiguous"),
    ]
    for header, words in bad:
        with pytest.raises(ValueError, match=words):
            _serial.check_table(header, 8 if "contiguous" not in words else 12)
