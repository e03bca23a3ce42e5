"""mae / mape / rmse against scikit-learn and pearson against scipy: weights, zero
targets, constant input, huge/tiny values, jit, pmap and bad input."""

import functools
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from jaxopt_lab import metrics as M

SIZES = st.sampled_from([1, 3, 8, 40])
ERRORS = {
    "mae": (M.mae, skm.mean_absolute_error),
    "mape": (M.mape, skm.mean_absolute_percentage_error),
    "rmse": (M.rmse, skm.root_mean_squared_error),
}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@functools.cache
def jitted(fn, **kwargs):
    """One compiled function per setting, reused across hypothesis examples."""
    return jax.jit(partial(fn, **kwargs))


def values(data, shape, zeros=True):
    """Floats over many magnitudes, with exact zeros (MAPE's degenerate case) mixed in."""
    element = st.floats(-1e6, 1e6, allow_nan=False)
    if zeros:
        element = element | st.just(0.0)
    flat = data.draw(st.lists(element, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return np.array(flat, float).reshape(shape)


@given(data=st.data(), n=SIZES, outputs=st.sampled_from([None, 1, 3]),
       multioutput=st.sampled_from(["uniform_average", "raw_values", "weights"]),
       weighted=st.booleans())
def test_errors_match_sklearn(data, n, outputs, multioutput, weighted):
    shape = (n,) if outputs is None else (n, outputs)
    y_true, y_pred = values(data, shape), values(data, shape)
    if data.draw(st.booleans()):
        y_pred = y_true + values(data, shape, zeros=False) * 1e-3  # near-perfect predictions
    weight = np.array(data.draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n))) \
        if weighted else None
    if multioutput == "weights":  # sklearn only takes output weights for several outputs
        multioutput = np.arange(1.0, outputs + 1) if outputs and outputs > 1 else "raw_values"
    for name, (ours, theirs) in ERRORS.items():
        expected = theirs(y_true, y_pred, sample_weight=weight, multioutput=multioutput)
        got = ours(y_true, y_pred, sample_weight=weight, multioutput=multioutput)
        assert got.shape == np.shape(expected), name
        # Relative: MAPE with a zero target is ~4.5e15 * |error|, exactly as in sklearn.
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12, err_msg=name)


def test_mape_zero_targets_follow_sklearn():
    y_true, y_pred = np.array([0.0, 0.0, 2.0]), np.array([0.0, 1e-3, 1.0])
    expected = skm.mean_absolute_percentage_error(y_true, y_pred)
    assert 1e11 < expected < np.inf
    np.testing.assert_allclose(M.mape(y_true, y_pred), expected, rtol=1e-12)
    with jax.enable_x64(False):
        np.testing.assert_allclose(M.mape(y_true, y_pred), expected, rtol=1e-6)


def scipy_pearson(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scipy.stats.pearsonr(x, y).statistic


@given(data=st.data(), n=st.sampled_from([2, 3, 8, 40]), correlated=st.booleans(),
       scale=st.sampled_from([1e-150, 1.0, 1e150]))
def test_pearson_matches_scipy_and_numpy(data, n, scale, correlated):
    x = np.array(data.draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n)), float)
    noise = np.array(data.draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n)), float)
    y = 3 * x + noise if correlated else noise
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        with pytest.raises(ValueError, match="constant"):
            M.pearson(x * scale, y * scale)
        assert np.isnan(scipy_pearson(x, y))
        return
    expected = scipy_pearson(x, y)
    np.testing.assert_allclose(expected, np.corrcoef(x, y)[0, 1], atol=1e-12)
    np.testing.assert_allclose(M.pearson(x * scale, y * scale), expected, atol=1e-6)


def test_pearson_reported_nearly_constant_float32():
    # issue 17: centring on the rounded mean (1.0) gave 0.7071.
    x, y = np.float32([1, 1, 1 + 2**-23]), np.float32([1, 2, 3])
    expected = scipy_pearson(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(expected, 0.8660254, atol=1e-7)
    np.testing.assert_allclose(M.pearson(x, y), expected, atol=1e-6)
    np.testing.assert_allclose(jitted(M.pearson)(x, y), expected, atol=1e-6)


@given(data=st.data(), n=st.sampled_from([2, 3, 8, 40]),
       base=st.floats(-2.0**100, 2.0**100, width=32).filter(lambda b: abs(b) > 2.0**-100))
def test_pearson_nearly_constant_float32_matches_scipy_on_exact_values(data, n, base):
    # Values a few ulps apart around ``base``: r of the float32 values themselves, as
    # scipy computes it in float64.
    steps = data.draw(st.lists(st.integers(-4, 4), min_size=n, max_size=n))
    x = np.float32(base) + np.asarray(steps, np.float32) * np.spacing(np.float32(base))
    y = np.asarray(data.draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n)),
                   np.float32)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return
    expected = scipy_pearson(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(M.pearson(x, y), expected, atol=1e-5)


def test_pearson_constant_input_is_nan_under_jit_never_a_finite_guess():
    x = np.full(5, 0.1)  # its mean is not exactly 0.1, so centring leaves rounding noise
    y = np.arange(5.0)
    assert np.isnan(scipy_pearson(x, y))
    with pytest.raises(ValueError, match="x is constant"):
        M.pearson(x, y)
    assert np.isnan(jitted(M.pearson)(x, y))


@settings(max_examples=10)
@given(data=st.data())
def test_jit_equals_eager(data):
    n = 12
    y_true, y_pred = values(data, (n, 2)), values(data, (n, 2))
    weight = np.array(data.draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n)))
    for name, (fn, _) in ERRORS.items():
        compiled = jitted(fn, multioutput="raw_values")
        np.testing.assert_allclose(compiled(y_true, y_pred, sample_weight=weight),
                                   fn(y_true, y_pred, sample_weight=weight,
                                      multioutput="raw_values"), rtol=1e-12, err_msg=name)
    x, y = y_true[:, 0] + np.arange(n), y_pred[:, 0]  # x is never constant
    if np.ptp(y) > 0:
        np.testing.assert_allclose(jitted(M.pearson)(x, y), M.pearson(x, y), atol=1e-12)


def test_axis_name_gives_the_whole_batch_metric_on_every_device():
    rng = np.random.default_rng(0)
    devices = jax.local_device_count()
    y_true, y_pred = rng.normal(size=(devices, 3)) + 2, rng.normal(size=(devices, 3))
    w = rng.uniform(0.5, 2, (devices, 3))
    flat = y_true.ravel(), y_pred.ravel()
    for name, (fn, theirs) in ERRORS.items():
        per_device = jax.pmap(partial(fn, axis_name="d"), axis_name="d")(
            y_true, y_pred, sample_weight=w)
        np.testing.assert_allclose(per_device, theirs(*flat, sample_weight=w.ravel()) *
                                   np.ones(devices), rtol=1e-6, err_msg=name)
    per_device = jax.pmap(partial(M.pearson, axis_name="d"), axis_name="d")(y_true, y_pred)
    np.testing.assert_allclose(per_device, np.corrcoef(*flat)[0, 1] * np.ones(devices), atol=1e-9)


def test_float32_agrees_within_float32_precision():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200) + 3
    b = a + rng.normal(size=200) * 0.3
    with jax.enable_x64(False):
        got = {name: fn(a, b) for name, (fn, _) in ERRORS.items()} | {"r": M.pearson(a, b)}
        assert all(v.dtype == jnp.float32 for v in got.values())
    for name, (_, theirs) in ERRORS.items():
        np.testing.assert_allclose(got[name], theirs(a, b), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(got["r"], np.corrcoef(a, b)[0, 1], atol=1e-6)


BAD_INPUTS = [
    (M.mae, ([1.0, 2.0], [1.0]), {}, "shape"),
    (M.rmse, ([], []), {}, "empty"),
    (M.mape, (np.zeros((2, 2, 2)), np.zeros((2, 2, 2))), {}, "rank 1 or 2"),
    (M.mae, ([1.0, np.nan], [1.0, 2.0]), {}, "NaN"),
    (M.rmse, ([1.0, 2.0], [1.0, np.inf]), {}, "Inf"),
    (M.mae, ([1.0, 2.0], [1.0, 2.0]), {"sample_weight": [1.0, -2.0]}, ">= 0"),
    (M.mae, ([1.0, 2.0], [1.0, 2.0]), {"multioutput": "variance_weighted"}, "multioutput"),
    (M.mae, ([1.0, 2.0], [1.0, 2.0]), {"multioutput": [1.0, 2.0]}, "weights have shape"),
    (M.pearson, ([1.0], [2.0]), {}, "at least 2"),
    (M.pearson, ([1.0, 2.0], [3.0, 3.0]), {}, "y is constant"),
    (M.pearson, ([[1.0, 2.0]], [[3.0, 4.0]]), {}, "rank 1"),
]


@pytest.mark.parametrize("fn, args, kwargs, match", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_problem(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


# ---------------------------------------------------------------- overflow / flushing (issue 7)
OVERFLOW_CASES = [  # float32 inputs whose errors (or their sums) overflow, metrics do not
    ([2e38, 2e38], [-1e38, -1e38]),  # y_pred - y_true itself overflows
    ([1e30, 0.0], [-1e30, 0.0]),  # squared errors overflow
    ([3e38, -3e38, 1.0], [-3e38, 3e38, 1.0]),  # |error| 6e38 each: mean 4e38 (inf)
    ([1e-20, 0.0, 0.0], [0.0, 0.0, 0.0]),  # squared errors underflow
    ([[3e38, 1.0], [1.0, 3e38]], [[-3e38, 1.0], [1.0, -3e38]]),  # per output near the top
]


@pytest.mark.parametrize("y_true, y_pred", OVERFLOW_CASES)
@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_are_finite_whenever_the_metric_is(name, y_true, y_pred):
    ours, theirs = ERRORS[name]
    a, b = np.asarray(y_true, np.float32), np.asarray(y_pred, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = theirs(a.astype(np.float64), b.astype(np.float64), multioutput="raw_values")
    with jax.enable_x64(False):
        got = np.asarray(ours(a, b, multioutput="raw_values"), np.float64)
    fits = np.abs(want) < np.finfo(np.float32).max
    assert (got[~fits] == np.inf).all(), (got, want)
    np.testing.assert_allclose(got[fits], want[fits], rtol=1e-6)


@pytest.mark.parametrize("x", [
    [1e38, -1e38, 3e38],  # 1 / max|x| is subnormal (flushed to 0 by XLA)
    [1.2e-38, 1.3e-38, 1.25e-38],  # normal values whose differences are subnormal
])
def test_pearson_of_huge_or_tiny_float32_values(x):
    x, y = np.asarray(x, np.float32), np.array([1.0, 2.0, 3.0], np.float32)
    want = np.corrcoef(x.astype(np.float64), y)[0, 1]
    with jax.enable_x64(False):
        assert abs(float(M.pearson(x, y)) - want) <= 1e-6
        assert abs(float(jitted(M.pearson)(x, y)) - want) <= 1e-6


def test_pearson_of_values_differing_only_by_subnormals_is_constant():
    x = np.array([0.0, 1e-45, 3e-45], np.float32)  # XLA flushes subnormals: all 0
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="x is constant.*subnormal"):
            M.pearson(x, [1.0, 2.0, 3.0])
        assert np.isnan(jitted(M.pearson)(x, np.array([1.0, 2.0, 3.0], np.float32)))
