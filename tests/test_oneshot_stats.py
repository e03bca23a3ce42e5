"""Calibration statistics: batching, jit, pmap and mesh give the same X^T X; bad input."""

import doctest
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh, PartitionSpec as P

from jaxopt_lab.oneshot import hessian_accumulate, hessian_init
from jaxopt_lab.oneshot.stats import check_stats

K = 6


def _x(seed, rows=16):
    return np.random.default_rng(seed).normal(size=(rows, K)).astype(np.float32) * 3


def _reference(x):
    x64 = np.asarray(x, np.float64).reshape(-1, K)
    return x64.T @ x64, np.abs(x64).sum(0), np.abs(x64).max(0), x64.shape[0]


@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_batches_add_up_to_the_whole(seed, parts):
    x = _x(seed, 8 * parts)
    s = hessian_init(K)
    for chunk in np.split(x, parts):
        s = hessian_accumulate(s, chunk.reshape(2, -1, K))  # leading axes are all token rows
    xtx, asum, amax, n = _reference(x)
    np.testing.assert_allclose(s.xtx, xtx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.abs_sum, asum, rtol=1e-5)
    np.testing.assert_allclose(s.abs_max, amax, rtol=1e-6)
    assert int(s.count) == n


@given(st.integers(0, 2**31 - 1))
def test_row_mask_equals_dropping_the_rows(seed):
    rng = np.random.default_rng(seed)
    x = _x(seed, 24).reshape(3, 8, K)
    mask = rng.integers(0, 2, size=(3, 8))
    mask[0, 0] = 1
    x[mask == 0] = np.inf  # padding garbage must not leak in
    s = hessian_accumulate(hessian_init(K), x, mask=mask)
    xtx, asum, amax, n = _reference(x[mask > 0])
    np.testing.assert_allclose(s.xtx, xtx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.abs_sum, asum, rtol=1e-5)
    np.testing.assert_allclose(s.abs_max, amax, rtol=1e-6)
    assert int(s.count) == n
    with pytest.raises(ValueError, match="mask of shape"):
        hessian_accumulate(hessian_init(K), x, mask=mask[:, :4])


@given(st.integers(0, 2**31 - 1))
def test_pmap_and_mesh_equal_single_device(seed):
    n_dev = jax.device_count()
    x = _x(seed, 4 * n_dev)
    single = hessian_accumulate(hessian_init(K), x)
    shards = x.reshape(n_dev, 4, K)
    init = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), hessian_init(K))
    pm = jax.pmap(lambda s, b: hessian_accumulate(s, b, axis_name="d"), axis_name="d")(
        init, shards)
    for i in (0, n_dev - 1):
        chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], pm), single, rtol=1e-5,
                                    atol=1e-4)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    sm = jax.jit(jax.shard_map(
        lambda b: hessian_accumulate(hessian_init(K), b, axis_name="d"), mesh=mesh,
        in_specs=P("d"), out_specs=P(), check_vma=False))(x)
    chex.assert_trees_all_close(sm, single, rtol=1e-5, atol=1e-4)


def test_bad_input_names_the_layer():
    with pytest.raises(ValueError, match="do not end in K=6"):
        hessian_accumulate(hessian_init(K), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="k must be"):
        hessian_init(0)
    with pytest.raises(ValueError, match=r"\['dense'\].*no calibration data"):
        check_stats("['dense']", hessian_init(K), K)
    nan = hessian_accumulate(hessian_init(K), jnp.full((2, K), jnp.nan))
    with pytest.raises(ValueError, match=r"\['dense'\].*NaN"):
        check_stats("['dense']", nan, K)
    with pytest.raises(ValueError, match=r"\['dense'\].*no calibration statistics"):
        check_stats("['dense']", None, K)


def test_docstring_examples_run():
    mod = importlib.import_module("jaxopt_lab.oneshot.stats")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0
