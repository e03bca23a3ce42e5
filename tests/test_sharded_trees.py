"""Tree transforms on trees sharded with NamedSharding over the 8 host devices: results
sharded like the inputs, no whole-leaf gather, global thresholds exact across shards."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxopt_lab as jol
from jaxopt_lab.pruning import select


def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("x",))


def _tree(seed=0, rows=64, cols=32):
    mesh, rng = _mesh(), np.random.default_rng(seed)
    specs = {"a": P("x", None), "b": P(None, "x"), "c": P("x")}
    shapes = {"a": (rows, cols), "b": (cols, rows), "c": (rows,)}
    return {k: jax.device_put(jnp.asarray(rng.normal(size=shapes[k]), jnp.float32),
                              NamedSharding(mesh, specs[k])) for k in specs}


def _gathers(fn, tree):
    hlo = jax.jit(fn).lower(tree).compile().as_text()
    return re.findall(r"= (\S+) all-gather\(", hlo)


def _storage(x):
    return x.qvalue if isinstance(x, jol.QTensor) else x


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_and_dequantize_stay_sharded_without_gathers(bits):
    tree = _tree()
    quantize = jax.jit(lambda t: jol.quantize(t, bits=bits))
    assert _gathers(lambda t: jol.quantize(t, bits=bits), tree) == []
    q = quantize(tree)
    for k, v in q.items():
        assert _storage(v).sharding.spec == tree[k].sharding.spec, k
    assert _gathers(jol.dequantize, q) == []
    d = jax.jit(jol.dequantize)(q)
    for k, v in d.items():
        assert v.sharding.spec == tree[k].sharding.spec, k
    # The same numbers as on one device.
    local = jax.tree.map(np.asarray, tree)
    want = jol.dequantize(jol.quantize(local, bits=bits))
    for k in tree:
        np.testing.assert_array_equal(np.asarray(d[k]), np.asarray(want[k]), err_msg=k)


@settings(max_examples=5)
@given(seed=st.integers(0, 2**16), sparsity=st.sampled_from([0.1, 0.5, 0.77, 0.9]))
def test_global_magnitude_mask_of_a_sharded_tree_is_exact(seed, sparsity):
    tree = _tree(seed)
    got = jax.jit(lambda t: jol.magnitude_mask(t, sparsity, scope="global"))(tree)
    want = jol.magnitude_mask(jax.tree.map(np.asarray, tree), sparsity, scope="global")
    total = sum(x.size for x in jax.tree.leaves(tree) if x.ndim >= 2)  # default: kernels
    pruned = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(got))
    assert pruned == int(select.count_to_prune(sparsity, total))
    for k in tree:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def _whole_leaf_gathers(fn, tree):
    """All-gathers whose result holds as many entries as the smallest sharded leaf."""
    smallest = min(x.size for x in jax.tree.leaves(tree))
    sizes = [int(np.prod([int(d) for d in re.findall(r"\d+", shape.split("{")[0])] or [1]))
             for shape in _gathers(fn, tree)]
    return [n for n in sizes if n >= smallest]


@pytest.mark.parametrize("rows,cols", [(512, 256), (64, 32), (8, 16)])
def test_global_magnitude_mask_stays_sharded_without_gathers(rows, cols):
    # 262144 scores: the sampled path unsharded; 6144: radix; 288: the sort path.
    tree = _tree(rows=rows, cols=cols)
    fn = lambda t: jol.magnitude_mask(t, 0.5, scope="global")  # noqa: E731
    masks = jax.jit(fn)(tree)
    assert all(masks[k].sharding.spec == tree[k].sharding.spec for k in tree)
    assert _whole_leaf_gathers(fn, tree) == []
    eager = fn(tree)  # eager calls on sharded arrays take the same path
    want = fn(jax.tree.map(np.asarray, tree))
    for k in tree:
        assert eager[k].sharding.spec == tree[k].sharding.spec, k
        np.testing.assert_array_equal(np.asarray(masks[k]), np.asarray(want[k]), err_msg=k)
        np.testing.assert_array_equal(np.asarray(eager[k]), np.asarray(want[k]), err_msg=k)


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**16),
    sparsity=st.floats(0.0, 1.0, width=32),
    levels=st.sampled_from([2, 5, 1000]),
    with_previous=st.booleans(),
    scope=st.sampled_from(["global", "layer"]),
    big=st.booleans(),
)
def test_sharded_masks_equal_unsharded_bit_for_bit(
    seed, sparsity, levels, with_previous, scope, big
):
    # Few distinct values force heavy ties: the tie cut (flat-index radix select) decides.
    tree = _tree(seed, rows=256 if big else 64, cols=64 if big else 32)
    tree = jax.tree.map(lambda x: jnp.round(x * levels) / levels, tree)
    previous = None
    if with_previous:
        previous = jax.tree.map(lambda x: jnp.abs(x) > 0.3, tree)
    where = lambda path, x: True  # noqa: E731  (1-D leaves too)
    fn = lambda t, p: jol.magnitude_mask(  # noqa: E731
        t, sparsity, scope=scope, where=where, previous=p)
    got = jax.jit(fn)(tree, previous)
    want = fn(jax.tree.map(np.asarray, tree),
              None if previous is None else jax.tree.map(np.asarray, previous))
    for k in tree:
        assert got[k].sharding.spec == tree[k].sharding.spec, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_prune_of_a_sharded_tree_stays_sharded_and_exact():
    import optax

    tree = _tree(rows=128, cols=64)
    mask_fn = functools.partial(jol.magnitude_mask, scope="global")
    tx = optax.chain(optax.sgd(0.1), jol.prune(mask_fn, 0.5))
    grads = jax.tree.map(jnp.ones_like, tree)

    def step(params):
        state = tx.init(params)
        updates, _ = tx.update(grads, state, params)
        return optax.apply_updates(params, updates)

    out = jax.jit(step)(tree)
    assert _whole_leaf_gathers(step, tree) == []
    want = jax.jit(step)(jax.tree.map(np.asarray, tree))
    for k in tree:
        assert out[k].sharding.spec == tree[k].sharding.spec, k
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(want[k]), err_msg=k)
