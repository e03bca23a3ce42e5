"""The native int8 kernels: int8 x int8 bit-identical to XLA's int32 dot, float32 x int8 the
product on the dequantized weights, whatever the shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab.quant import native

needs_native = pytest.mark.skipif(not native.native_int8_available(),
                                  reason=native.native_int8_status())
matmul = jax.jit(native.int8_matmul)


def _xla(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


@needs_native
@settings(max_examples=15)
@given(st.integers(1, 13), st.integers(1, 70), st.integers(1, 140), st.integers(0, 2**31 - 1))
def test_native_equals_xla_for_every_tail(m, k, n, seed):
    # m around the 6-row tile, k around the 4-byte quad, n around the 64-column panel.
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    b = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    np.testing.assert_array_equal(matmul(a, b), np.asarray(a, np.int64) @ np.asarray(b, np.int64))


@needs_native
@settings(max_examples=15)
@given(st.integers(90, 420), st.integers(1, 40), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_native_tall_products_split_along_rows(m, k, n, seed):
    # A convolution's patches @ kernel: many rows (split into row chunks across threads),
    # few columns (the 16- and 32-column tiles of a narrow panel), every row tail.
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    b = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    np.testing.assert_array_equal(matmul(a, b), np.asarray(a, np.int64) @ np.asarray(b, np.int64))


@needs_native
def test_native_handles_extremes_and_a_multi_panel_product():
    a = jnp.full((7, 260), -128, jnp.int8)
    b = jnp.full((260, 200), -128, jnp.int8).at[::3].set(127)
    np.testing.assert_array_equal(matmul(a, b), _xla(a, b))
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.integers(-127, 128, (50, 512)), jnp.int8)
    b = jnp.asarray(rng.integers(-127, 128, (512, 320)), jnp.int8)
    np.testing.assert_array_equal(matmul(a, b), _xla(a, b))


def test_switching_the_kernel_off_gives_the_xla_dot():
    a = jnp.ones((3, 4), jnp.int8)
    b = jnp.ones((4, 5), jnp.int8)
    with native.use_native_int8(False):
        jaxpr = str(jax.make_jaxpr(lambda a, b: native.int8_matmul(a, b))(a, b))
    assert "ffi_call" not in jaxpr
    np.testing.assert_array_equal(native.int8_matmul(a, b), np.full((3, 5), 4))


def test_bad_operands_raise():
    with pytest.raises(TypeError, match="int8"):
        native.int8_matmul(jnp.ones((2, 3)), jnp.ones((3, 2), jnp.int8))
    with pytest.raises(TypeError, match="int8"):
        native.int8_matmul(jnp.ones((2, 3), jnp.int8), jnp.ones((2, 2), jnp.int8))


def test_empty_operands():
    out = native.int8_matmul(jnp.zeros((0, 3), jnp.int8), jnp.zeros((3, 4), jnp.int8))
    assert out.shape == (0, 4) and out.dtype == jnp.int32
    np.testing.assert_array_equal(
        native.int8_matmul(jnp.zeros((2, 0), jnp.int8), jnp.zeros((0, 4), jnp.int8)), 0)


# --- float32 x int8 (weight-only) ------------------------------------------------------

float_matmul = jax.jit(native.float_int8_matmul)


def _float_operands(rng, m, k, n):
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    s = jnp.asarray(rng.uniform(1e-3, 1e-1, n), jnp.float32)
    return a, b, s


def _assert_float_close(y, a, b, s):
    """Within float32 summation error of the exact product on the dequantized weights."""
    w = np.asarray(b, np.float32) * np.asarray(s, np.float32)  # dequantize's float32 values
    a64, w64 = np.asarray(a, np.float64), w.astype(np.float64)
    bound = 2 * a.shape[1] * np.finfo(np.float32).eps * (np.abs(a64) @ np.abs(w64)) + 1e-30
    assert np.all(np.abs(np.asarray(y, np.float64) - a64 @ w64) <= bound)


@needs_native
@settings(max_examples=15)
@given(st.integers(1, 13), st.integers(1, 70), st.integers(1, 140), st.integers(0, 2**31 - 1))
def test_float_kernel_is_the_dequantized_product_for_every_tail(m, k, n, seed):
    # m around the 6-row tile, n around the 64-column panel, any k.
    a, b, s = _float_operands(np.random.default_rng(seed), m, k, n)
    y = float_matmul(a, b, s)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    _assert_float_close(y, a, b, s)
    with native.use_native_int8(False):  # XLA's dot on the dequantized weight agrees
        xla = jax.jit(native.float_int8_matmul)(a, b, s)
    np.testing.assert_allclose(y, xla, rtol=1e-5, atol=1e-5 * float(np.abs(xla).max()))


@needs_native
@settings(max_examples=15)
@given(st.integers(90, 420), st.integers(1, 40), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_float_kernel_tall_products_split_along_rows(m, k, n, seed):
    # Row chunks across threads and the narrow-panel tiles, as for a convolution's patches.
    a, b, s = _float_operands(np.random.default_rng(seed), m, k, n)
    _assert_float_close(float_matmul(a, b, s), a, b, s)


@needs_native
def test_float_kernel_extremes_nonfinite_inputs_and_vmap():
    rng = np.random.default_rng(1)
    a, b, s = _float_operands(rng, 50, 512, 320)
    b = b.at[::3].set(-128).at[1::7].set(127)
    _assert_float_close(float_matmul(a, b, s), a, b, s)
    a = a.at[3, 5].set(jnp.nan).at[7, 9].set(jnp.inf)
    y = np.asarray(float_matmul(a, b, s))
    assert np.isnan(y[3]).all() and not np.isfinite(y[7]).any()
    assert np.isfinite(np.delete(y, [3, 7], axis=0)).all()
    batched = jax.vmap(native.float_int8_matmul, in_axes=(0, None, None))(
        jnp.stack([a[:4], a[10:14]]), b, s)
    np.testing.assert_array_equal(batched[1], float_matmul(a[10:14], b, s))


def test_float_kernel_bad_operands_and_empty():
    a, b, s = jnp.ones((2, 3)), jnp.ones((3, 4), jnp.int8), jnp.ones(4)
    for bad in ((a.astype(jnp.bfloat16), b, s), (a, b.astype(jnp.int32), s), (a, b, s[:3]),
                (a, b[:2], s)):
        with pytest.raises(TypeError, match="float_int8_matmul"):
            native.float_int8_matmul(*bad)
    out = native.float_int8_matmul(jnp.zeros((0, 3)), b, s)
    assert out.shape == (0, 4) and out.dtype == jnp.float32
    np.testing.assert_array_equal(native.float_int8_matmul(jnp.ones((2, 0)),
                                                           jnp.zeros((0, 4), jnp.int8), s), 0)
