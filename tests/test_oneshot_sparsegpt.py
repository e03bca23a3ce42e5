"""SparseGPT: 0% is the identity, exact counts, N:M validity, infinite damping is magnitude
pruning, joint quantization on the grid, mask trees, errors naming the layer."""

import doctest
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.oneshot import hessian_accumulate, hessian_init, sparsegpt, sparsegpt_matrix

K, N = 16, 6


def _data(seed, rows=48):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, K)) @ (rng.normal(size=(K, K)) * 0.3 + np.eye(K))
    return x.astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)


@given(st.integers(0, 2**31 - 1))
def test_zero_sparsity_returns_the_weights_unchanged(seed):
    x, w = _data(seed)
    w2, mask = sparsegpt_matrix(w, x.T @ x, sparsity=0.0, block_size=8)
    np.testing.assert_array_equal(w2, w)
    assert bool(mask.all())


# Sparsity and block size are compile-time settings of the sweep: a few values, so the
# ci profile compiles a handful of programs instead of one per example.
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.1, 1 / 3, 0.5, 0.7, 1.0]),
       st.sampled_from([4, 16]))
def test_exact_sparsity(seed, s, block):
    x, w = _data(seed)
    w2, mask = sparsegpt_matrix(w, x.T @ x, sparsity=s, block_size=block)
    assert int((~mask).sum()) == int(np.floor(s * K * N))
    assert bool((np.asarray(w2)[~np.asarray(mask)] == 0).all())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@given(seed=st.integers(0, 2**31 - 1))
def test_n_m_validity(n, m, seed):
    x, w = _data(seed)
    w2, mask = sparsegpt_matrix(w, x.T @ x, n=n, m=m, block_size=8)
    kept = np.asarray(mask).reshape(K // m, m, N).sum(1)
    assert (kept == n).all()
    assert bool((np.asarray(w2)[~np.asarray(mask)] == 0).all())


@given(st.integers(0, 2**31 - 1))
def test_infinite_damping_is_magnitude_pruning(seed):
    x, w = _data(seed)
    # One block ranks the whole matrix at once, as the layer-scope magnitude mask does.
    w2, mask = sparsegpt_matrix(w, x.T @ x, sparsity=0.5, damp=float("inf"), block_size=K)
    np.testing.assert_array_equal(mask, jol.magnitude_mask(jnp.asarray(w), 0.5))
    np.testing.assert_array_equal(w2, np.where(mask, w, 0))
    _, nm = sparsegpt_matrix(w, x.T @ x, n=2, m=4, damp=float("inf"))
    np.testing.assert_array_equal(nm, jol.nm_mask(jnp.asarray(w), n=2, m=4, axis=0))


@given(st.integers(0, 2**31 - 1))
def test_compensation_beats_magnitude_pruning_on_the_calibration_inputs(seed):
    # Greedy: on 16x6 toys it lost to magnitude pruning in 13/30 seeds (median 0.97x), so
    # the property is checked at a size where the second-order choice matters (64x16 with
    # uneven channel scales: 0.34x-0.50x over 5 seeds).
    rng = np.random.default_rng(seed)
    k, n = 64, 16
    x = (rng.normal(size=(256, k)) @ (rng.normal(size=(k, k)) * 0.3 + np.eye(k))
         * np.exp(rng.uniform(-1.5, 1.5, k))).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    w2, _ = sparsegpt_matrix(w, x.T @ x, sparsity=0.5, block_size=32)
    mag = np.where(jol.magnitude_mask(jnp.asarray(w), 0.5), w, 0)
    err = lambda v: np.linalg.norm(x @ (w - np.asarray(v)))  # noqa: E731
    assert err(w2) <= 0.8 * err(mag)


def test_joint_quantization_lies_on_the_grid():
    x, w = _data(0)
    w2, mask = sparsegpt_matrix(w, x.T @ x, n=2, m=4, bits=4, group_size=8)
    assert bool((np.asarray(w2)[~np.asarray(mask)] == 0).all())
    # Without compensation the kept weights are exactly round-to-nearest's values.
    w3, mask3 = sparsegpt_matrix(w, x.T @ x, n=2, m=4, bits=4, group_size=8,
                                 damp=float("inf"))
    rtn = jol.dequantize(jol.quantize(jnp.asarray(w), bits=4, granularity="group",
                                      group_size=8))
    np.testing.assert_array_equal(w3, np.where(mask3, rtn, 0))


def test_tree_level_mask_tree():
    x, w = _data(0)
    params = {"a": {"kernel": jnp.asarray(w), "bias": jnp.ones(N)}}
    stats = {"a": hessian_accumulate(hessian_init(K), x)}
    new, masks = sparsegpt(params, stats, sparsity=0.25)
    assert masks["a"]["bias"].all() and new["a"]["bias"] is params["a"]["bias"]
    np.testing.assert_array_equal(jol.apply_mask(new, masks)["a"]["kernel"], new["a"]["kernel"])
    assert int((~masks["a"]["kernel"]).sum()) == K * N // 4


def test_bad_input_raises_naming_the_layer():
    x, w = _data(0)
    params = {"a": {"kernel": jnp.asarray(w)}}
    stats = {"a": hessian_accumulate(hessian_init(K), x)}
    name = r"\['a'\]\['kernel'\]"
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=name + ".*sparsity must be in"):
            sparsegpt(params, stats, sparsity=bad)
    with pytest.raises(ValueError, match=name + ".*not divisible by m=5"):
        sparsegpt(params, stats, n=2, m=5)
    with pytest.raises(ValueError, match=name + ".*no calibration data"):
        sparsegpt(params, {"a": hessian_init(K)}, sparsity=0.5)
    with pytest.raises(ValueError, match=name + ".*no calibration statistics"):
        sparsegpt(params, {}, sparsity=0.5)
    with pytest.raises(ValueError, match=name + ".*either sparsity or n:m"):
        sparsegpt(params, stats, sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="L.*NaN"):
        sparsegpt_matrix(w, np.full((K, K), np.nan), sparsity=0.5, name="L")


# Regression (fuzz finding: test_fuzz_oneshot's sparsegpt tree test, kernel 'a' of "huge"
# weights): error compensation overflowed float32 for weights near its limit and the NaN
# was reported as "the damped Hessian is not positive definite", a Hessian fault, for
# valid 8-row Hessians; and squared scores were Inf for every |w| > 2^64, so the mask
# ranked those weights by position. The sweep is homogeneous in W: a power-of-two scale
# must give the same mask and exactly scaled weights.
@pytest.mark.parametrize("exp", [40, 100, 126])
@pytest.mark.parametrize("prune", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_huge_weights_are_pruned_like_their_scaled_down_copy(exp, prune):
    x, w = _data(1)
    h = x.T @ x
    w_ref, m_ref = sparsegpt_matrix(w, h, **prune, block_size=8)
    w_big, m_big = sparsegpt_matrix(w * np.float32(2.0**exp), h, **prune, block_size=8)
    np.testing.assert_array_equal(m_big, m_ref)
    np.testing.assert_allclose(np.asarray(w_big, np.float64) / 2.0**exp, w_ref, rtol=1e-6,
                               atol=1e-6)


def test_an_unrepresentable_result_is_reported_as_overflow_not_as_a_hessian_fault():
    # The fuzz example itself: kernel 'a' of _tree_case(seed=0, k=4, kind="huge").
    rng = np.random.default_rng(0)
    sign = np.where(rng.random((4, 4)) < 0.5, -1.0, 1.0)
    w = (sign * float(np.finfo(np.float32).max) * rng.uniform(0.25, 1.0, (4, 4)))
    w = w.astype(np.float32)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    h = hessian_accumulate(hessian_init(4), x).xtx
    # The exact result (the sweep of w / 2^20, scaled back) exceeds float32's range.
    small, _ = sparsegpt_matrix(w / np.float32(2.0**20), h, sparsity=0.5)
    assert np.abs(np.asarray(small, np.float64)).max() * 2.0**20 > np.finfo(np.float32).max
    with pytest.raises(ValueError, match="L: the error-compensated weights overflow") as err:
        sparsegpt_matrix(w, h, sparsity=0.5, name="L")
    assert "positive definite" not in str(err.value)


def test_non_finite_weights_are_named_as_such():
    x, w = _data(0)
    for bad in (np.nan, np.inf):
        w2 = w.copy()
        w2[3, 2] = bad
        with pytest.raises(ValueError, match="L: the weights hold NaN or Inf"):
            sparsegpt_matrix(w2, x.T @ x, sparsity=0.5, name="L")


def test_docstring_examples_run():
    mod = importlib.import_module("jaxopt_lab.oneshot.sparsegpt")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0
