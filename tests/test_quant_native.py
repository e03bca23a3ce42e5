"""The native int8 matmul is bit-identical to XLA's int32 dot, whatever the shape."""

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
