"""_serial.py (helpers of io): JSON values round-trip; arrays go through the safetensors
package bit-exactly and records that do not fit their tensor are rejected."""

import math
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
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
                                 "complex64", "int4", "float8_e4m3fn"]), max_size=4),
       st.lists(st.integers(0, 3), max_size=3))
def test_storage_arrays_round_trip_through_the_safetensors_package(dtypes, shape):
    tensors = [(f"t{i}", np.asarray(np.arange(math.prod(shape)).reshape(shape) % 3,
                                    jnp.dtype(d))) for i, d in enumerate(dtypes)]
    arrays, table = _serial.storage_arrays(tensors)
    assert list(table) == [name for name, _ in tensors]
    back = dict(safetensors.deserialize(safetensors.numpy.save(arrays)))
    for name, arr in tensors:
        code = table[name]["dtype"]
        assert back[name]["dtype"] == code and back[name]["shape"] == table[name]["shape"]
        assert bytes(back[name]["data"]) == arr.tobytes()
        assert _serial.crc32(arrays[name]) == zlib.crc32(arr.tobytes())
        if code != "U8" or arr.dtype == np.uint8:  # known dtypes keep their shape
            assert tuple(table[name]["shape"]) == arr.shape
        rec = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "kind": "numpy"}
        got = _serial._array(rec, {name: (code, tuple(back[name]["shape"]), back[name]["data"])})
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert got.tobytes() == arr.tobytes()


def test_array_records_that_do_not_fit_their_tensor_are_rejected():
    buf = np.zeros(2, np.float32).tobytes()
    rec = {"name": "a", "dtype": "float32", "shape": [2], "kind": "numpy"}
    bad = [
        ({}, "missing"),
        ({"a": ("F32", (3,), buf)}, "do not fit"),
        ({"a": ("I32", (2,), buf)}, "record says"),
    ]
    for table, words in bad:
        with pytest.raises(ValueError, match=words):
            _serial._array(rec, table)
    with pytest.raises(ValueError, match="record says"):
        _serial._array({**rec, "shape": [1, 2]}, {"a": ("F32", (2,), buf)})
