"""Eager `quantize` of concrete leaves (quant/eager.py): one program for any shapes, and the
same QTensors bit for bit as the per-leaf compiled path, eager or under ``jit``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.quant import core, eager

DTYPES = (np.float32, ml_dtypes.bfloat16, np.float16)


def _bits_of(a):
    return None if a is None else (str(a.dtype), np.asarray(a).shape, np.asarray(a).tobytes())


def assert_same_bits(got, want):
    """Same QTensor: metadata, and codes/scale/zero point byte for byte (NaN, -0 too)."""
    assert type(got) is type(want) is jol.QTensor
    assert got._aux() == want._aux()
    for name in ("qvalue", "scale", "zero_point"):
        assert _bits_of(getattr(got, name)) == _bits_of(getattr(want, name)), name


def per_leaf(tree, **kw):
    """The per-leaf compiled path (`core.quantize_array`), which quantize used for every
    leaf before the batched path."""
    base = dict(bits=8, granularity="channel", group_size=None, symmetric=True, axis=-1,
                dtype=None, scale_dtype="float32")
    base.update(kw)
    return jax.tree.map(
        lambda x: core.quantize_array(x, **core.leaf_settings("x", x, base, True)), tree)


@st.composite
def leaf_and_settings(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["normal", "tiny", "huge", "zeros", "ties", "positive"]))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = {"normal": lambda: rng.normal(size=shape) * 10 ** rng.uniform(-3, 3),
         "tiny": lambda: rng.normal(size=shape) * 1e-39,
         "huge": lambda: rng.normal(size=shape) * 1e37,
         "zeros": lambda: np.zeros(shape),
         "ties": lambda: rng.integers(-8, 8, size=shape) * 0.5,
         "positive": lambda: rng.uniform(0, 3, size=shape)}[kind]()
    x = np.clip(x, -np.finfo(dtype).max, np.finfo(dtype).max).astype(dtype)
    if draw(st.booleans()):
        kw = dict(dtype=draw(st.sampled_from(["float8_e4m3fn", "float8_e5m2"])),
                  granularity=draw(st.sampled_from(["tensor", "channel"])))
    else:
        kw = dict(bits=draw(st.sampled_from([2, 3, 4, 8])),
                  symmetric=draw(st.booleans()),
                  scale_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                  granularity=draw(st.sampled_from(["tensor", "channel", "group"])))
        if kw["granularity"] == "group":
            contraction = shape[-2] if ndim >= 2 else shape[0]
            kw["group_size"] = draw(st.sampled_from(
                [g for g in range(1, contraction + 1) if contraction % g == 0]))
    return jnp.asarray(x), kw


@given(leaf_and_settings())
def test_batched_equals_per_leaf_bit_for_bit(case):
    x, kw = case
    a = np.abs(np.asarray(x, np.float32))
    subnormal = bool(np.any((a > 0) & (a < np.finfo(np.float32).tiny)))
    assert eager.batchable(x) is not subnormal  # subnormals: the per-leaf program
    assert_same_bits(jol.quantize(x, **kw), per_leaf(x, **kw))


@given(leaf_and_settings())
def test_jit_equals_eager(case):
    x, kw = case
    assert_same_bits(jax.jit(lambda a: jol.quantize(a, **kw))(x), jol.quantize(x, **kw))


def _mlp(seed=0, sizes=(64, 256, 150, 10)):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
    return {f"Dense_{i}": {"kernel": jax.random.normal(k, (a, b)), "bias": jnp.zeros(b)}
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def test_tree_with_mixed_overrides_matches_per_leaf():
    params = _mlp()

    def where(path, leaf):  # mixed precision: one batch per setting group
        if leaf.ndim < 2:
            return False
        return {"bits": 4, "granularity": "group", "group_size": 16} if leaf.shape[0] == 64 \
            else {"bits": 8, "symmetric": False}

    q = jol.quantize(params, where=where)
    assert q["Dense_0"]["bias"] is params["Dense_0"]["bias"]
    assert_same_bits(q["Dense_0"]["kernel"],
                     per_leaf(params["Dense_0"]["kernel"], bits=4, granularity="group",
                              group_size=16))
    for name in ("Dense_1", "Dense_2"):
        assert_same_bits(q[name]["kernel"],
                         per_leaf(params[name]["kernel"], bits=8, symmetric=False))


def test_batches_split_and_large_leaves_take_the_per_leaf_path(monkeypatch):
    params = _mlp()
    want = jol.quantize(params, bits=4)
    monkeypatch.setattr(eager, "MAX_BATCH_ELEMENTS", 20_000)  # three batches
    got = jol.quantize(params, bits=4)
    monkeypatch.setattr(eager, "MAX_LEAF_ELEMENTS", 10_000)  # Dense_1 alone is per leaf
    mixed = jol.quantize(params, bits=4)
    for name in params:
        assert_same_bits(got[name]["kernel"], want[name]["kernel"])
        assert_same_bits(mixed[name]["kernel"], want[name]["kernel"])


def test_new_shapes_reuse_the_compiled_program():
    jol.quantize(_mlp(0), bits=8)
    before = eager._flat_codes._cache_size()
    jol.quantize(_mlp(1, sizes=(64, 200, 100, 10)), bits=8)  # other shapes, same bucket
    assert eager._flat_codes._cache_size() == before


def test_leaf_devices_are_kept():
    devices = jax.devices()
    x = jax.device_put(jnp.arange(24.0).reshape(4, 6), devices[-1])
    q = jol.quantize(x, bits=8, symmetric=False)
    for a in (q.qvalue, q.scale, q.zero_point):
        assert a.devices() == {devices[-1]}


def test_uncommitted_leaf_gives_uncommitted_arrays():
    q = jol.quantize(jnp.arange(24.0).reshape(4, 6), bits=4, symmetric=False)
    assert not any(a.committed for a in (q.qvalue, q.scale, q.zero_point))


def test_sharded_leaf_keeps_its_sharding():
    if len(jax.devices()) < 2:
        pytest.skip("needs several devices (tests/conftest.py sets 8)")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "d"))
    x = jax.device_put(jnp.arange(32.0).reshape(4, 8), sharding)
    assert not eager.batchable(x)
    q = jol.quantize(x, bits=8)
    assert len(q.qvalue.sharding.device_set) == 2
    assert_same_bits(q, per_leaf(jnp.asarray(np.asarray(x)), bits=8))


def test_float64_numpy_leaf_records_the_dtype_jax_gives_it():
    x = np.linspace(-1, 1, 12).reshape(3, 4)  # float64; jax without x64 makes it float32
    assert_same_bits(jol.quantize(x, bits=8), per_leaf(jnp.asarray(x), bits=8))


def test_nan_is_still_rejected_naming_the_leaf():
    with pytest.raises(ValueError, match="w.*NaN"):
        jol.quantize({"w": jnp.array([[1.0, jnp.nan], [0.0, 1.0]])}, bits=8)
