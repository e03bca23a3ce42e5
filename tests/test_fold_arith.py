"""Properties of the folding arithmetic (jaxopt_lab/fold/arith.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.fold import arith


def _inputs(rng, c=5, *, bias=True, scale=True, beta=True, **over):
    kw = dict(
        kernel=rng.normal(size=(3, 3, 2, c)).astype(np.float32),
        bias=rng.normal(size=c).astype(np.float32) if bias else None,
        mean=rng.normal(size=c).astype(np.float32),
        var=rng.uniform(0.1, 4.0, size=c).astype(np.float32),
        scale=rng.normal(size=c).astype(np.float32) if scale else None,
        beta=rng.normal(size=c).astype(np.float32) if beta else None,
        epsilon=1e-5, stat_dtype=np.float32, kernel_shape=(c,), bias_shape=(c,),
    )
    kw.update(over)
    return arith.FoldInputs(**kw)


def _bn(y, a: arith.FoldInputs, mean, var, scale, beta):
    """What a BatchNorm computes on y (float64 reference)."""
    g = 1.0 if scale is None else scale
    b = 0.0 if beta is None else beta
    return (y - mean) / np.sqrt(var.astype(np.float64) + a.epsilon) * g + b


@given(eps=st.floats(1e-12, 0.5), dtype=st.sampled_from([np.float32, np.float64, np.float16]))
def test_identity_variance_adds_to_exactly_one(eps, dtype):
    v = arith.identity_variance(eps, dtype)
    assert v.dtype == np.dtype(dtype)
    assert (v + np.asarray(eps, dtype)).astype(dtype) == 1


def test_identity_variance_bfloat16():
    v = arith.identity_variance(1e-3, jnp.bfloat16)
    assert float(jnp.asarray(v, jnp.bfloat16) + jnp.asarray(1e-3, jnp.bfloat16)) == 1.0


@pytest.mark.parametrize("bias,beta", [(True, True), (False, True), (False, False), (True, False)])
@pytest.mark.parametrize("scale", [True, False])
def test_fold_matches_layer_then_batchnorm(bias, beta, scale):
    rng = np.random.default_rng(0)
    a = _inputs(rng, bias=bias, scale=scale, beta=beta)
    out = arith.fold(a)
    x = rng.normal(size=(7, 3 * 3 * 2)).astype(np.float64)
    w = a.kernel.reshape(-1, 5).astype(np.float64)
    y = x @ w + (0.0 if a.bias is None else a.bias)
    want = _bn(y, a, a.mean, a.var, a.scale, a.beta)
    y2 = x @ out.kernel.reshape(-1, 5) + (0.0 if out.bias is None else out.bias)
    got = _bn(y2, a, out.mean, out.var, out.scale, out.beta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert out.shift_in == (arith.SHIFT_IN_LAYER if bias else
                            arith.SHIFT_IN_BN_BIAS if beta else arith.SHIFT_IN_BN_MEAN)
    assert arith.is_identity(out.mean, out.var, out.scale, a.epsilon, np.float32)
    for new, old in zip(out[:6], a[:6]):
        assert (new is None) == (old is None)
        if new is not None:
            assert new.dtype == old.dtype and new.shape == old.shape


def test_fold_twice_is_bitwise_noop():
    a = _inputs(np.random.default_rng(1), bias=False, beta=False)
    once = arith.fold(a)
    twice = arith.fold(a._replace(kernel=once.kernel, mean=once.mean, var=once.var,
                                  scale=once.scale, beta=once.beta))
    for x, y in zip(once[:6], twice[:6]):
        assert (x is None and y is None) or np.array_equal(x, y)


def test_zero_scale_gives_constant_channel_not_nan():
    a = _inputs(np.random.default_rng(2), scale=True)
    a = a._replace(scale=np.zeros(5, np.float32), var=np.zeros(5, np.float32))
    out = arith.fold(a)
    assert np.all(out.kernel == 0) and np.all(np.isfinite(out.bias))
    np.testing.assert_array_equal(out.bias, a.beta)


@pytest.mark.parametrize("field,value", [
    ("var", np.array([1, 1, -1, 1, 1], np.float32)),
    ("var", np.array([1, np.nan, 1, 1, 1], np.float32)),
    ("var", np.array([1, np.inf, 1, 1, 1], np.float32)),
    ("mean", np.array([1, 1, 1, 1, np.nan], np.float32)),
    ("scale", np.array([1, 1, np.inf, 1, 1], np.float32)),
    ("beta", np.array([np.nan, 1, 1, 1, 1], np.float32)),
])
def test_bad_statistics_raise(field, value):
    a = _inputs(np.random.default_rng(3))._replace(**{field: value})
    with pytest.raises(ValueError, match="finite|positive"):
        arith.fold(a)


def test_is_identity_rejects_ordinary_statistics():
    assert not arith.is_identity(np.zeros(3), np.ones(3), None, 1e-5, np.float32)
    v = np.full(3, arith.identity_variance(1e-5, np.float32))
    assert arith.is_identity(np.zeros(3), v, np.ones(3, np.float32), 1e-5, np.float32)
    assert not arith.is_identity(np.zeros(3), v, np.full(3, 2.0, np.float32), 1e-5, np.float32)


@given(seed=st.integers(0, 2**16), var_exp=st.integers(-8, 6), scale_exp=st.integers(-3, 3),
       mean_scale=st.sampled_from([0.0, 1.0, 1e3]), zero=st.booleans())
def test_fold_is_backward_stable_over_wide_ranges(seed, var_exp, scale_exp, mean_scale, zero):
    """Error stays within float32 rounding of the terms involved, for tiny/huge statistics."""
    rng = np.random.default_rng(seed)
    c = 6
    var = (10.0 ** var_exp * rng.uniform(0.5, 2.0, c)).astype(np.float32)
    scale = (10.0 ** scale_exp * rng.normal(size=c)).astype(np.float32)
    if zero:
        var[0], scale[1] = 0.0, 0.0
    a = _inputs(rng, c)._replace(mean=(mean_scale * rng.normal(size=c)).astype(np.float32),
                                 var=var, scale=scale, epsilon=1e-3)
    out = arith.fold(a)
    x = rng.normal(size=(5, 3 * 3 * 2))
    w = a.kernel.reshape(-1, c).astype(np.float64)
    y = x @ w + a.bias
    want = _bn(y, a, a.mean, a.var, a.scale, a.beta)
    got = _bn(x @ out.kernel.reshape(-1, c) + out.bias, a, out.mean, out.var, out.scale,
              out.beta)
    m = np.abs(a.scale) / np.sqrt(a.var.astype(np.float64) + a.epsilon)
    terms = m * (np.abs(x) @ np.abs(w) + np.abs(a.bias) + np.abs(a.mean)) + np.abs(a.beta)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - want) <= 1e-6 * terms + 1e-30)
