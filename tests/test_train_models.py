"""The reference models' building blocks."""

import functools

import flax.linen as nn
import jax
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.app.models import max_pool_2x2

_shapes = st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.integers(1, 3))


def _linen_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


@functools.partial(jax.jit, static_argnums=0)
def _grad(pool, x):
    # Jitted: op-by-op, this gradient compiles each primitive for every new shape (~1 s).
    return jax.grad(lambda x: (pool(jax.nn.relu(x)) ** 2).sum())(x)


@given(shape=_shapes, seed=st.integers(0, 2**16), negative_fraction=st.sampled_from([0, .5, 1]))
def test_max_pool_2x2_equals_linen_max_pool_in_value_and_gradient_after_relu(
        shape, seed, negative_fraction):
    x = np.abs(np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape)))
    # Negative entries become exact ties at 0 after the ReLU (whole windows of them, often).
    x[np.random.default_rng(seed).random(shape) < negative_fraction] *= -1
    np.testing.assert_array_equal(max_pool_2x2(x), _linen_pool(x))
    np.testing.assert_array_equal(jax.jit(max_pool_2x2)(x), _linen_pool(x))
    np.testing.assert_array_equal(_grad(max_pool_2x2, x), _grad(_linen_pool, x))


def test_max_pool_2x2_splits_a_positive_tie_where_max_pool_picks_one():
    x = np.ones((1, 2, 2, 1), np.float32)
    np.testing.assert_array_equal(_grad(max_pool_2x2, x).ravel(), [0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(_grad(_linen_pool, x).ravel(), [2.0, 0.0, 0.0, 0.0])
