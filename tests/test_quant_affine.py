"""quant/affine.py: the affine numerics every quantizer shares.

``q = clip(round(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``: zero exactly
representable, every value of ``[lo, hi]`` within half a step, a positive finite scale for a
constant slice, ties rounded away from zero, division correctly rounded.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.quant.affine import (
    affine_codes,
    affine_params,
    clamp_cast,
    divide,
    integer_range,
    round_half_away,
)

bits = st.sampled_from([2, 3, 4, 8])
finite = st.floats(-1e30, 1e30).map(lambda v: float(np.float32(v)))


@pytest.mark.parametrize("b", [2, 3, 4, 8])
def test_integer_range(b):
    assert integer_range(b, True) == (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1)
    assert integer_range(b, False) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1)


# Ends whose quotients by the level count are subnormal (flushed to zero on CPU).
tiny = st.floats(-1e-35, 1e-35).map(lambda v: float(np.float32(v)))


@given(finite, finite, bits, st.booleans())
def test_range_round_trips_within_half_a_step_and_zero_is_exact(a, b, nbits, symmetric):
    _check_round_trip(a, b, nbits, symmetric)


@given(tiny, tiny, bits, st.booleans())
def test_tiny_ranges_round_trip_within_half_a_step(a, b, nbits, symmetric):
    # Was: asymmetric int3 of [-4.6e-38, 4.7e-38] got the smallest normal as its scale
    # (both quotients flushed), too small a step for the range, which then clipped.
    _check_round_trip(a, b, nbits, symmetric)


def test_the_reported_tiny_range_keeps_its_ends():
    _check_round_trip(-4.62851e-38, 4.68361e-38, 3, False)


def _check_round_trip(a, b, nbits, symmetric):
    lo, hi = min(a, b), max(a, b)
    scale, zero = affine_params(lo, hi, bits=nbits, symmetric=symmetric)
    s = float(scale)
    assert np.isfinite(s) and s > 0
    assert (zero is None) == symmetric
    z = 0 if zero is None else int(zero)
    qmin, qmax = integer_range(nbits, symmetric)
    assert qmin <= z <= qmax
    xs = np.array([lo, hi, 0.0, (lo + hi) / 2], np.float32)
    q = np.asarray(affine_codes(xs, scale, zero, bits=nbits, symmetric=symmetric))
    assert q.dtype == np.int8 and (q >= qmin).all() and (q <= qmax).all()
    x_hat = (q.astype(np.float64) - z) * s
    assert x_hat[2] == 0.0  # zero is exactly representable
    inside = (xs >= min(lo, 0) if not symmetric else True) & (
        xs <= max(hi, 0) if not symmetric else True)
    err = np.abs(x_hat - xs.astype(np.float64))[inside]
    assert (err <= 0.5 * s * (1 + 1e-5)).all(), (lo, hi, s, z, q, x_hat)


@given(finite, bits, st.booleans())
def test_constant_slice_gets_a_positive_scale(c, nbits, symmetric):
    scale, zero = affine_params(c, c, bits=nbits, symmetric=symmetric)
    assert float(scale) > 0 and np.isfinite(float(scale))
    q = affine_codes(np.float32(c), scale, zero, bits=nbits, symmetric=symmetric)
    x_hat = (int(q) - (0 if zero is None else int(zero))) * float(scale)
    assert abs(x_hat - c) <= 0.5 * float(scale) * (1 + 1e-5)


def test_all_zero_slice_has_scale_one():
    for symmetric in (True, False):
        scale, zero = affine_params(0.0, 0.0, bits=8, symmetric=symmetric)
        assert float(scale) == 1.0
        q = affine_codes(np.zeros(3, np.float32), scale, zero, bits=8, symmetric=symmetric)
        assert (np.asarray(q, np.int32) == (0 if zero is None else int(zero))).all()


@given(st.integers(-1000, 1000))
def test_round_half_away_from_zero(n):
    v = jnp.asarray([n + 0.5, n - 0.5, n + 0.25, n + 0.75], jnp.float32)
    got = np.asarray(round_half_away(v))
    want = [np.sign(x) * np.floor(abs(x) + 0.5) for x in np.asarray(v, np.float64)]
    np.testing.assert_array_equal(got, want)


@given(st.floats(-3e38, 3e38).map(np.float32), st.floats(1e-30, 3e38).map(np.float32))
def test_divide_is_correctly_rounded(x, s):
    got = np.asarray(divide(np.float32(x), np.full((3,), s, np.float32)))
    want = np.float32(np.float64(np.float32(x)) / np.float64(np.float32(s)))
    assert got.shape == (3,)
    if np.abs(want) >= np.finfo(np.float32).tiny or want == 0:  # XLA flushes subnormals
        np.testing.assert_array_equal(got, want)


def test_huge_scale_still_divides():
    # 1 / 2**127 is subnormal: a multiply by the reciprocal would flush every code to 0.
    assert float(np.asarray(divide(np.float32(2.0**127), np.float32(2.0**127)))) == 1.0


def test_clamp_cast_keeps_values_finite_and_nan_nan():
    x = jnp.asarray([1e6, -1e6, 1.0, jnp.nan], jnp.float32)
    out = np.asarray(clamp_cast(x, jnp.float16), np.float32)
    assert out[0] == np.finfo(np.float16).max and out[1] == -np.finfo(np.float16).max
    assert out[2] == 1.0 and np.isnan(out[3])
    assert clamp_cast(jnp.asarray([3.7]), jnp.int8).dtype == jnp.int8
