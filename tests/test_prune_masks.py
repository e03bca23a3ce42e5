"""Unstructured mask functions: exact counts, nesting, selection, jit, bad input."""

import math
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol

NASTY = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, 3e38, np.inf, -np.inf, np.nan])
VALUES = st.floats(-10, 10, width=32) | NASTY


@st.composite
def trees(draw):
    """Two kernels (one large enough for the radix path), a bias and an int leaf."""
    small_values = draw(st.sampled_from([VALUES, st.sampled_from([0.0, 1.0, -1.0])]))
    k0 = draw(hnp.arrays(np.float32, (64, 80), elements=small_values))
    k1 = draw(hnp.arrays(np.float32, (6, 7), elements=VALUES))
    return {
        "a": {"kernel": jnp.asarray(k0), "bias": jnp.ones(80)},
        "b": {"kernel": jnp.asarray(k1)},
        "step": jnp.int32(3),
    }


_layer = jax.jit(lambda t, s: jol.magnitude_mask(t, s))
_global = jax.jit(lambda t, s: jol.magnitude_mask(t, s, scope="global"))
_nested = jax.jit(lambda t, s, prev: jol.magnitude_mask(t, s, previous=prev))


def zeros(mask):
    return int((~np.asarray(mask)).sum())


@given(trees(), st.floats(0.0, 1.0))
def test_layer_scope_exact_per_leaf(tree, s):
    mask = _layer(tree, s)
    for name in ("a", "b"):
        kernel = tree[name]["kernel"]
        assert zeros(mask[name]["kernel"]) == _count(s, kernel.size)
    assert bool(mask["a"]["bias"].all()) and bool(mask["step"])


@given(trees(), st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.97, 1.0]))
def test_python_sparsity_exact_and_jit_equal(tree, s):
    eager = jol.magnitude_mask(tree, s)
    for name in ("a", "b"):
        assert zeros(eager[name]["kernel"]) == _count(s, tree[name]["kernel"].size)
    jax.tree.map(np.testing.assert_array_equal, eager, _layer(tree, s))


@given(trees(), st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]))
def test_global_scope_exact_total_and_keeps_largest(tree, s):
    mask = _global(tree, s)
    total = tree["a"]["kernel"].size + tree["b"]["kernel"].size
    assert zeros(mask["a"]["kernel"]) + zeros(mask["b"]["kernel"]) == _count(s, total)
    key = {n: np.nan_to_num(np.abs(np.asarray(tree[n]["kernel"])), nan=np.inf) for n in "ab"}
    kept = np.concatenate([key[n][np.asarray(mask[n]["kernel"])] for n in "ab"])
    pruned = np.concatenate([key[n][~np.asarray(mask[n]["kernel"])] for n in "ab"])
    if kept.size and pruned.size:
        assert pruned.max() <= kept.min()


@given(trees())
def test_masks_nested_along_rising_sparsity(tree):
    prev = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), tree)
    for s in (0.1, 0.3, 0.3, 0.6, 0.9, 1.0):
        mask = _nested(tree, jnp.float32(s), prev)
        for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(prev)):
            assert not np.any(np.asarray(a) & ~np.asarray(b)), "a pruned entry came back"
        # pruning the masked tree again ranks its zeros first: same result
        prev = mask


def test_ties_broken_by_index():
    tree = {"w": jnp.ones((4, 4))}
    mask = jol.magnitude_mask(tree, 0.25)["w"]
    np.testing.assert_array_equal(np.asarray(mask).ravel(), np.arange(16) >= 4)


def test_where_callable_and_per_leaf_override():
    tree = {"a": jnp.arange(1.0, 17.0).reshape(4, 4), "b": jnp.arange(1.0, 17.0).reshape(4, 4)}
    mask = jol.magnitude_mask(tree, 0.5, where=lambda p, x: {"sparsity": 0.25} if "a" in str(p)
                              else True)
    assert zeros(mask["a"]) == 4 and zeros(mask["b"]) == 8
    only_b = jol.magnitude_mask(tree, 0.5, where=lambda p, x: "b" in str(p))
    assert zeros(only_b["a"]) == 0 and zeros(only_b["b"]) == 8


def test_random_mask_exact_nested_and_deterministic():
    tree = {"w": jnp.zeros((64, 80)), "v": jnp.zeros((5, 5))}
    key = jax.random.PRNGKey(3)
    prev = None
    for s in (0.2, 0.5, 0.8):
        m = jol.random_mask(tree, s, key=key)
        assert zeros(m["w"]) == math.floor(s * 64 * 80) and zeros(m["v"]) == math.floor(s * 25)
        if prev is not None:
            assert not np.any(np.asarray(m["w"]) & ~np.asarray(prev["w"]))
        prev = m
    again = jol.random_mask(tree, 0.8, key=key)
    jax.tree.map(np.testing.assert_array_equal, prev, again)
    other = jol.random_mask(tree, 0.8, key=jax.random.PRNGKey(4))
    assert not np.array_equal(np.asarray(other["w"]), np.asarray(prev["w"]))


def test_saliency_mask_scores_weight_times_grad():
    rng = np.random.default_rng(0)
    w = {"x": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    g = {"x": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    got = jol.saliency_mask(w, 0.5, grads=g)
    want = jol.magnitude_mask({"x": w["x"] * g["x"]}, 0.5)
    np.testing.assert_array_equal(np.asarray(got["x"]), np.asarray(want["x"]))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_sparsity_out_of_range_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        jol.magnitude_mask({"w": jnp.ones((4, 4))}, bad)


def test_bad_arguments_raise_value_error():
    tree = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="scope"):
        jol.magnitude_mask(tree, 0.5, scope="row")
    with pytest.raises(ValueError, match="previous mask"):
        jol.magnitude_mask(tree, 0.5, previous={"v": jnp.ones((4, 4), bool)})
    with pytest.raises(ValueError, match=r"\['w'\].*shape"):
        jol.magnitude_mask(tree, 0.5, previous={"w": jnp.ones((2, 4), bool)})
    with pytest.raises(ValueError, match="grads"):
        jol.saliency_mask(tree, 0.5, grads={"w": jnp.ones((4, 4)), "x": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"\['w'\].*grads shape"):
        jol.saliency_mask(tree, 0.5, grads={"w": jnp.ones((4, 2))})
    with pytest.raises(ValueError, match="key"):
        jol.random_mask(tree, 0.5, key=None)
    with pytest.raises(ValueError, match="scope='layer'"):
        jol.magnitude_mask(tree, 0.5, scope="global", where=lambda p, x: {"sparsity": 0.1})
    with pytest.raises(ValueError, match=r"unknown per-leaf setting\(s\)"):
        jol.magnitude_mask(tree, 0.5, where=lambda p, x: {"bits": 4})
    with pytest.raises(ValueError, match="required"):
        jol.magnitude_mask(tree, None)


def test_eager_and_jit_agree_for_every_mask_function():
    rng = np.random.default_rng(1)
    tree = {"w": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32), "b": jnp.ones(12)}
    grads = jax.tree.map(lambda x: x * 0.5 + 1.0, tree)
    key = jax.random.PRNGKey(0)
    fns = [
        lambda t: jol.random_mask(t, 0.4, key=key),
        lambda t: jol.saliency_mask(t, 0.4, grads=grads),
        lambda t: jol.nm_mask(t, n=1, m=4),
        lambda t: jol.channel_mask(t, 0.5, norm="l1"),
        lambda t: jol.magnitude_mask(t, 0.4, scope="global"),
    ]
    for fn in fns:
        jax.tree.map(np.testing.assert_array_equal, fn(tree), jax.jit(fn)(tree))


def _count(s, size):
    """floor(float32(sparsity) * size), exactly: the one definition of the pruned count."""
    return math.floor(Fraction(float(np.float32(s))) * size)
