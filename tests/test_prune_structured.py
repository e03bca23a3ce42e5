"""N:M and channel masks: validity, exact counts, nesting, bad input."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol

VALUES = st.floats(-10, 10, width=32) | st.sampled_from([0.0, -0.0, 1.0, np.inf, np.nan])
NM = [(2, 4), (1, 4), (4, 8), (0, 4), (4, 4)]


def groups(mask, m, axis):
    """(..., groups, m) view of a mask grouped along ``axis``."""
    moved = np.moveaxis(np.asarray(mask), axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


_nm = {nm: jax.jit(lambda t, nm=nm: jol.nm_mask(t, n=nm[0], m=nm[1])) for nm in NM}


@given(hnp.arrays(np.float32, (16, 6), elements=VALUES), st.sampled_from(NM))
def test_nm_every_group_keeps_exactly_n_largest(w, nm):
    n, m = nm
    mask = _nm[nm]({"w": jnp.asarray(w), "b": jnp.ones(6)})
    g = groups(mask["w"], m, 0)
    assert (g.sum(-1) == n).all()
    mag = groups(np.nan_to_num(np.abs(w), nan=np.inf), m, 0)
    kept_min = np.where(g, mag, np.inf).min(-1)
    pruned_max = np.where(g, -np.inf, mag).max(-1)
    assert (pruned_max <= kept_min).all()
    assert bool(mask["b"].all())


def test_nm_conv_kernel_groups_input_channels():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 5))
    mask = jol.nm_mask({"k": w}, n=2, m=4)["k"]
    assert (groups(mask, 4, -2).sum(-1) == 2).all()
    assert int(mask.sum()) == w.size // 2


@pytest.mark.parametrize("s,kept", [(0.0, 4), (0.25, 3), (0.5, 2), (0.9, 2), (None, 2)])
def test_nm_sparsity_ramps_to_pattern(s, kept):
    w = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    got = jax.jit(lambda w, s: jol.nm_mask({"w": w}, s, n=2, m=4))(w, s)["w"]
    assert (groups(got, 4, 0).sum(-1) == kept).all()


def test_nm_nested_along_ramp():
    w = {"w": jax.random.normal(jax.random.PRNGKey(2), (16, 4))}
    prev = jax.tree.map(lambda x: jnp.ones(x.shape, bool), w)
    for s in (0.25, 0.5):
        w["w"] = w["w"] * 0.5 + jax.random.normal(jax.random.PRNGKey(int(s * 8)), (16, 4))
        cur = jol.nm_mask(w, s, previous=prev)
        assert not np.any(np.asarray(cur["w"]) & ~np.asarray(prev["w"]))
        prev = cur


def test_nm_bad_input():
    w = {"w": jnp.ones((6, 4))}
    with pytest.raises(ValueError, match="n <= m"):
        jol.nm_mask(w, n=5, m=4)
    with pytest.raises(ValueError, match=r"\['w'\].*length 6, not divisible by m=4"):
        jol.nm_mask(w, n=2, m=4, where=lambda p, x: {"axis": 0})
    with pytest.warns(jol.LayoutFallbackWarning, match=r"\['w'\].*length 6.*left unpruned"):
        assert bool(jol.nm_mask(w, n=2, m=4)["w"].all())
    with pytest.raises(ValueError, match="out of range"):
        jol.nm_mask({"b": jnp.ones((8,))}, n=2, m=4, where=lambda p, x: True)
    with pytest.raises(ValueError, match="sparsity"):
        jol.nm_mask({"w": jnp.ones((8, 4))}, 1.5)
    with pytest.raises(TypeError, match="int"):
        jol.nm_mask(w, n=2.0, m=4)


_channel = jax.jit(lambda t, s: jol.channel_mask(t, s))


@given(hnp.arrays(np.float32, (3, 3, 4, 12), elements=VALUES), st.floats(0, 1))
def test_channel_mask_whole_channels_exact_count(w, s):
    mask = np.asarray(_channel({"k": jnp.asarray(w)}, jnp.float32(s))["k"])
    per_channel = mask.reshape(-1, 12)
    assert (per_channel.all(0) | ~per_channel.any(0)).all(), "channel partly pruned"
    dropped = int((~per_channel.all(0)).sum())
    assert dropped == math.floor(np.float32(s) * 12 * (1 + 2**-22))
    norms = np.nan_to_num(np.sqrt((w.astype(np.float64) ** 2).reshape(-1, 12).sum(0)), nan=np.inf)
    alive = per_channel.all(0)
    if alive.any() and (~alive).any():
        assert norms[~alive].max() <= norms[alive].min()


def test_channel_mask_l1_differs_from_l2_and_nests():
    w = jnp.asarray([[3.0, 1.0, 0.1], [0.0, 1.0, 0.1], [0.0, 1.0, 0.1]])
    assert jol.channel_mask({"w": w}, 1 / 3, norm="l1")["w"][0].tolist() == [True, True, False]
    assert jol.channel_mask({"w": w}, 2 / 3, norm="l2")["w"][0].tolist() == [True, False, False]
    assert jol.channel_mask({"w": w}, 2 / 3, norm="l1")["w"][0].tolist() == [False, True, False]
    prev = jol.channel_mask({"w": w}, 1 / 3)
    nested = jol.channel_mask({"w": w * jnp.asarray([[1.0, 1.0, 100.0]])}, 2 / 3, previous=prev)
    assert nested["w"][0].tolist() == [True, False, False]


def test_channel_mask_bad_input():
    with pytest.raises(ValueError, match="norm"):
        jol.channel_mask({"w": jnp.ones((2, 2))}, 0.5, norm="l3")
    with pytest.raises(ValueError, match="sparsity"):
        jol.channel_mask({"w": jnp.ones((2, 2))}, -0.5)
    with pytest.raises(ValueError, match="out of range"):
        jol.channel_mask({"w": jnp.ones((2, 2))}, 0.5, axis=3)


@pytest.mark.parametrize("shape, axis", [((3, 0), -1), ((0, 3), 0), ((2, 0, 4), -1)])
def test_channel_mask_empty_leaf_gets_empty_all_true_mask(shape, axis):
    """As magnitude_mask does: an empty selected leaf (no channels, or channels with no
    entries) gets an empty mask, with or without ``previous`` (was ZeroDivisionError)."""
    tree = {"w": jnp.zeros(shape), "k": jnp.ones((2, 4))}
    for previous in (None, jax.tree.map(lambda x: np.ones(np.shape(x), bool), tree)):
        mask = jol.channel_mask(tree, 0.5, axis=axis, where=lambda p, x: True,
                                previous=previous)
        assert mask["w"].shape == shape and mask["w"].dtype == bool
        assert int((~mask["k"]).sum()) == 4  # the other leaf loses half its channels


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 300), spread=st.integers(0, 30),
       norm=st.sampled_from(["l1", "l2"]))
def test_channel_norms_do_not_depend_on_the_order_of_the_sum(seed, rows, spread, norm):
    # Bit-for-bit the same in any order (so a leaf sharded across devices, summed per
    # shard and all-reduced, ranks its channels as on one device), and accurate.
    from jaxopt_lab.pruning import structured

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 5)) * 10.0 ** rng.integers(-spread, spread + 1, size=(rows, 5))
    x = x.astype(np.float32)
    norms = np.asarray(structured._channel_norm(x, (0,), norm))
    for perm in (rng.permutation(rows), np.arange(rows)[::-1]):
        again = np.asarray(jax.jit(structured._channel_norm, static_argnums=(1, 2))(
            x[perm], (0,), norm))
        assert norms.tobytes() == again.tobytes()
    x64 = x.astype(np.float64)
    want = np.abs(x64).sum(0) if norm == "l1" else np.sqrt(np.square(x64).sum(0))
    with np.errstate(over="ignore"):
        in_float32 = np.abs(x).sum(0) if norm == "l1" else np.square(x).sum(0)
    # float32 overflow gives inf, as before; squares below float32's normal range flush to 0
    # on XLA CPU (as before), so only sums well above that range are compared.
    ok = np.isfinite(in_float32) & ((want if norm == "l1" else np.square(want)) > 1e-28)
    np.testing.assert_allclose(norms[ok], want[ok], rtol=2e-6)
    assert np.isinf(norms[~np.isfinite(in_float32)]).all()


def test_channel_norms_propagate_nan_and_inf():
    from jaxopt_lab.pruning import structured

    x = np.array([[np.inf, 1.0, np.nan, 0.0], [1.0, 2.0, np.inf, 0.0]], np.float32)
    got = np.asarray(structured._channel_norm(x, (0,), "l1"))
    assert np.isinf(got[0]) and got[1] == 3.0 and np.isnan(got[2]) and got[3] == 0.0
    assert np.asarray(structured._channel_norm(np.zeros((0, 3)), (0,), "l2")).tolist() == [0] * 3
