"""QTensor storage: exact bit packing, pytree behaviour under jit/vmap/pmap/sharding."""

import functools
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab.quant.qtensor import QTensor, pack, packed_length, unpack

BITS = (2, 3, 4, 8)
SHAPES = ((1,), (2, 3, 5), (4, 17))


@st.composite
def codes(draw):
    bits = draw(st.sampled_from(BITS))
    shape = draw(st.sampled_from(SHAPES))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    arr = draw(hnp.arrays(np.int8, shape, elements=st.integers(lo, hi)))
    return bits, arr


@given(codes())
def test_pack_unpack_is_exact(case):
    bits, c = case
    n = c.shape[-1]
    packed = pack(jnp.asarray(c), bits)
    assert packed.shape == c.shape[:-1] + (packed_length(n, bits),)
    assert packed.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits, n)), c)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_jit_equals_no_jit(bits):
    c = np.random.default_rng(bits).integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (3, 11))
    c = jnp.asarray(c, jnp.int8)
    with jax.disable_jit():
        eager = pack(c, bits)
        back = unpack(eager, bits, 11)
    chex.assert_trees_all_equal(eager, pack(c, bits))
    chex.assert_trees_all_equal(back, c)


@pytest.mark.parametrize("bits, per_byte", [(2, 4), (4, 2), (8, 1)])
def test_packing_really_shrinks_bytes(bits, per_byte):
    w = jnp.ones((64, 128))
    qt = jol.quantize(w, bits=bits, granularity="tensor")
    assert qt.qvalue.nbytes == w.size // per_byte
    assert packed_length(128, 3) == 48  # eight 3-bit codes in three bytes


def test_pack_layout_is_little_endian_within_a_byte():
    assert pack(jnp.array([1, -1, 0, -2], jnp.int8), 4).tolist() == [0xF1, 0xE0]
    assert pack(jnp.array([1, -1, 0, -2], jnp.int8), 2).tolist() == [0b10_00_11_01]


def _qt(bits=4, shape=(8, 6), **kw):
    x = jax.random.normal(jax.random.PRNGKey(bits), shape)
    return x, jol.quantize(x, bits=bits, **kw)


def test_pytree_flatten_roundtrip_and_key_paths():
    _, qt = _qt(symmetric=False)
    leaves, treedef = jax.tree.flatten(qt)
    assert len(leaves) == 3
    back = jax.tree.unflatten(treedef, leaves)
    chex.assert_trees_all_equal(back.dequantize(), qt.dequantize())
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qt)[0]]
    assert paths == [".qvalue", ".scale", ".zero_point"]
    _, sym = _qt()
    assert len(jax.tree.leaves(sym)) == 2 and sym.zero_point is None  # None child is no leaf


def test_static_metadata_and_repr():
    x, qt = _qt(bits=4, granularity="group", group_size=4)
    assert (qt.shape, qt.dtype, qt.ndim, qt.size) == ((8, 6), jnp.float32, 2, 48)
    assert (qt.bits, qt.granularity, qt.group_size, qt.group_axis, qt.axis) == (4, "group", 4, (0,), None)
    assert qt.scale.shape == (2, 6) and qt.scale.dtype == jnp.float32
    assert "int4" in repr(qt) and "group_size=4" in repr(qt)
    assert qt.nbytes == 8 * 3 + 2 * 6 * 4
    assert qt.values().shape == (8, 6) and qt.values().dtype == jnp.int8


@pytest.mark.parametrize("bits", BITS)
def test_jit_dequantize_traces_once_per_structure(bits):
    chex.clear_trace_counter()
    x, qt = _qt(bits=bits, symmetric=False)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q):
        return q.dequantize()

    chex.assert_trees_all_equal(f(qt), qt.dequantize())
    qt2 = jol.quantize(x * 2, bits=bits, symmetric=False)
    chex.assert_trees_all_equal(f(qt2), qt2.dequantize())  # same aux data: no retrace


def test_vmap_over_stacked_qtensors_and_direct_batched_dequantize():
    xs = jax.random.normal(jax.random.PRNGKey(0), (5, 6, 7))
    per_item = [jol.quantize(x, bits=3, granularity="group", group_size=2) for x in xs]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_item)
    want = jnp.stack([q.dequantize() for q in per_item])
    chex.assert_trees_all_equal(jax.vmap(lambda q: q.dequantize())(stacked), want)
    chex.assert_trees_all_equal(stacked.dequantize(), want)  # leading axes act as a batch
    stacked_q = jax.vmap(lambda x: jol.quantize(x, bits=3, granularity="group", group_size=2))(xs)
    chex.assert_trees_all_equal(stacked_q.dequantize(), want)


def test_pmap_stacked_and_replicated_match_single_device():
    n = 2  # two of the 8 host devices: same semantics, cheaper compiles
    pmap = functools.partial(jax.pmap, devices=jax.devices()[:n])
    xs = jax.random.normal(jax.random.PRNGKey(1), (n, 4, 9))
    per_item = [jol.quantize(x, bits=4, symmetric=False) for x in xs]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_item)
    got = pmap(lambda q: q.dequantize())(stacked)
    chex.assert_trees_all_equal(got, jnp.stack([q.dequantize() for q in per_item]))
    one = per_item[0]
    rep = pmap(lambda q, y: q.dequantize() * y, in_axes=(None, 0))(one, jnp.ones(n))
    chex.assert_trees_all_equal(rep, jnp.stack([one.dequantize()] * n))
    made = pmap(lambda x: jol.quantize(x, bits=4, symmetric=False))(xs)
    chex.assert_trees_all_equal(made.dequantize(), got)


def test_named_sharding_of_children():
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    x, qt = _qt(bits=8, shape=(16, 8))
    sharded = jax.device_put(qt, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    got = jax.jit(lambda q: q.dequantize())(sharded)
    chex.assert_trees_all_equal(got, qt.dequantize())


def test_scalar_and_fp8_storage():
    qt = jol.quantize(jnp.float32(-3.0), bits=4, granularity="tensor")
    assert qt.qvalue.shape == (1,) and qt.dequantize().shape == ()
    assert float(qt.dequantize()) == -3.0
    f8 = jol.quantize(jnp.ones((2, 3)), dtype="float8_e5m2")
    assert f8.qvalue.dtype == jnp.float8_e5m2 and f8.values().shape == (2, 3)


def test_mismatched_storage_is_rejected():
    _, qt = _qt(bits=4)
    bad = QTensor(qt.qvalue[:, :1], qt.scale, bits=4, shape=qt.shape, dtype=qt.dtype,
                  granularity="channel", axis=1)
    with pytest.raises(ValueError, match="does not match"):
        bad.dequantize()
