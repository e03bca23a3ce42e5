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


def _gathers(fn, *args):
    hlo = jax.jit(fn).lower(*args).compile().as_text()
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


def _conv_tree(seed=0, levels=None):
    """Dense and HWIO conv kernels sharded along each axis in turn, and a sharded bias."""
    mesh, rng = _mesh(), np.random.default_rng(seed)
    leaves = {
        "dense_in": ((64, 32), P("x", None)),  # sharded along the N:M contraction
        "dense_out": ((32, 64), P(None, "x")),  # sharded along the channels
        "conv_in": ((3, 3, 64, 16), P(None, None, "x", None)),
        "conv_out": ((3, 3, 12, 16), P(None, None, None, "x")),
        "conv_h": ((8, 3, 4, 8), P("x", None, None, None)),
        "bias": ((64,), P("x")),
    }
    tree = {}
    for k, (shape, spec) in leaves.items():
        x = rng.normal(size=shape).astype(np.float32)
        if levels is not None:  # few distinct values: heavy ties, exactly summed norms
            x = np.round(x * levels) / levels
        tree[k] = jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
    return tree


def _assert_sharded_like_and_equal(got, want, tree):
    for k in tree:
        sharding = _storage(got[k]).sharding
        assert sharding.is_equivalent_to(tree[k].sharding, tree[k].ndim), (k, sharding)
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


STRUCTURED = {
    "nm_2_4": lambda t, s: jol.nm_mask(t, n=2, m=4),
    "nm_ramp_1_4": lambda t, s: jol.nm_mask(t, s, n=1, m=4),
    "nm_axis0": lambda t, s: jol.nm_mask(  # conv_h's 1-row shards split its groups
        t, n=1, m=2, axis=0, where=lambda path, x: x.ndim >= 2 and x.shape[0] % 2 == 0),
    "channel_l2": lambda t, s: jol.channel_mask(t, s),
    "channel_l1_axis0": lambda t, s: jol.channel_mask(t, s, norm="l1", axis=0),
}


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_masks_of_a_sharded_tree_are_exact_without_gathers(name):
    tree = _conv_tree(levels=4)
    fn = functools.partial(STRUCTURED[name], s=0.5)
    assert _gathers(fn, tree) == []
    local = jax.tree.map(np.asarray, tree)
    want = fn(local)
    _assert_sharded_like_and_equal(jax.jit(fn)(tree), want, tree)
    if name.startswith("nm"):  # eager on sharded arrays too (the channel sums' many small
        _assert_sharded_like_and_equal(fn(tree), want, tree)  # ops take minutes eagerly)


@settings(max_examples=5)
@given(seed=st.integers(0, 2**16), sparsity=st.floats(0.0, 1.0, width=32),
       levels=st.sampled_from([2, 1000, None]), with_previous=st.booleans(),
       kind=st.sampled_from(["nm", "channel"]))
def test_structured_masks_of_a_sharded_tree_equal_unsharded_bit_for_bit(
    seed, sparsity, levels, with_previous, kind
):
    tree = _conv_tree(seed, levels)
    previous = None
    if with_previous:
        previous = jax.tree.map(lambda x: jnp.abs(x) > 0.3, tree)
    if kind == "nm":
        fn = lambda t, p: jol.nm_mask(t, sparsity, n=2, m=4, previous=p)  # noqa: E731
    else:
        fn = lambda t, p: jol.channel_mask(t, sparsity, previous=p)  # noqa: E731
    got = jax.jit(fn)(tree, previous)
    want = fn(jax.tree.map(np.asarray, tree),
              None if previous is None else jax.tree.map(np.asarray, previous))
    _assert_sharded_like_and_equal(got, want, tree)


def _convs(path, x):
    return x.ndim == 4


@pytest.mark.parametrize("mask_fn, schedule, where", [
    (functools.partial(jol.nm_mask, n=2, m=4), None, None),
    (functools.partial(jol.nm_mask, n=2, m=4), 0.3, _convs),
    (jol.channel_mask, 0.5, None),
    (functools.partial(jol.channel_mask, norm="l1"), 0.25, _convs),
], ids=["nm", "nm_ramp_convs", "channel_l2", "channel_l1_convs"])
def test_prune_with_structured_masks_of_a_sharded_tree_is_exact_without_gathers(
    mask_fn, schedule, where
):
    import optax

    tree = _conv_tree(levels=4)
    tx = optax.chain(optax.sgd(0.1), jol.prune(mask_fn, schedule, where=where))
    grads = jax.tree.map(jnp.ones_like, tree)

    def two_steps(params, state):
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    state = tx.init(tree)
    for k in tree:  # the initial all-True masks live where their weights do
        assert state[1].masks[k].sharding.is_equivalent_to(tree[k].sharding, tree[k].ndim), k
    assert _gathers(two_steps, tree, state) == []
    out, out_state = jax.jit(two_steps)(tree, state)
    local = jax.tree.map(np.asarray, tree)
    want, want_state = jax.jit(two_steps)(local, tx.init(local))
    _assert_sharded_like_and_equal(out, want, tree)
    _assert_sharded_like_and_equal(out_state[1].masks, want_state[1].masks, tree)
