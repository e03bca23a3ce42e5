"""Convolutions as patch matrix products: same results as ``lax.conv_general_dilated``."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from jaxopt_lab import app
from jaxopt_lab._conv_matmul import conv_as_matmul, convs_as_matmuls

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, k, padding, **kw):
    return lax.conv_general_dilated(x, k, kw.pop("strides", (1, 1)), padding,
                                    dimension_numbers=DN, **kw)


def _both(padding):
    """Outputs and gradients of both implementations, in one jitted program per shape."""
    ours = lambda x, k: conv_as_matmul(x, k, (1, 1), padding, dimension_numbers=DN)  # noqa: E731
    ref = lambda x, k: _lax(x, k, padding)  # noqa: E731
    grad = lambda f: jax.grad(lambda x, k: 0.5 * jnp.sum(f(x, k) ** 2), (0, 1))  # noqa: E731
    return jax.jit(lambda x, k: ((ours(x, k), grad(ours)(x, k)), (ref(x, k), grad(ref)(x, k))))


CASES = [  # (x shape, kernel shape, padding): a few shapes, each compiled once
    ((2, 5, 5, 1), (3, 3, 1, 4), "SAME"),
    ((1, 4, 7, 3), (2, 3, 3, 2), "VALID"),
    ((3, 5, 5, 2), (1, 1, 2, 3), "SAME"),
    ((2, 6, 5, 2), (3, 2, 2, 2), ((1, 0), (2, 1))),
]
_PROGRAMS = {}


@settings(max_examples=12)
@given(case=st.sampled_from(range(len(CASES))), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 1e-20, 1e15]), zeros=st.booleans())
def test_equals_lax_convolution_and_its_gradients(case, seed, scale, zeros):
    xs, ks, padding = CASES[case]
    rng = np.random.default_rng(seed)  # numpy inputs: nothing to compile for them
    x = (rng.normal(size=xs) * scale).astype(np.float32)
    k = (rng.normal(size=ks) * (0.0 if zeros else 1.0)).astype(np.float32)
    program = _PROGRAMS.setdefault(case, _both(padding))
    ours, ref = program(x, k)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        # equal up to float summation order, relative to the leaf's magnitude
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.max(np.abs(b))) + 1e-30)


def test_other_convolutions_fall_back_to_lax_exactly():
    rng = np.random.default_rng(0)
    x, k = rng.normal(size=(2, 6, 6, 4)), rng.normal(size=(3, 3, 2, 4))
    kw = dict(rhs_dilation=(2, 1), dimension_numbers=DN, feature_group_count=2)
    got, want = jax.jit(lambda x, k: (conv_as_matmul(x, k, (2, 1), "SAME", **kw),
                                      lax.conv_general_dilated(x, k, (2, 1), "SAME", **kw)))(x, k)
    np.testing.assert_array_equal(got, want)


def test_vmapped_over_kernels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    ks = rng.normal(size=(4, 3, 3, 3, 2)).astype(np.float32)
    f = lambda k: conv_as_matmul(x, k, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    g = lambda k: _lax(x, k, "SAME")  # noqa: E731
    got, want = jax.jit(lambda ks: (jax.vmap(f)(ks), jax.vmap(g)(ks)))(ks)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


def test_context_rewrites_linen_convs_only_inside_it():
    model = app.StudentCNN()
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    v = jax.jit(lambda k: model.init(k, x))(jax.random.PRNGKey(1))
    with convs_as_matmuls():
        rewritten = jax.jit(model.apply).lower(v, x)
    plain = jax.jit(model.apply).lower(v, x)
    assert "convolution" not in rewritten.as_text() and "convolution" in plain.as_text()
    chex.assert_trees_all_close(rewritten.compile()(v, x), plain.compile()(v, x), atol=1e-5)


def test_custom_conv_functions_are_left_alone():
    calls = []

    def mine(*args, **kwargs):
        calls.append(1)
        return lax.conv_general_dilated(*args, **kwargs)

    layer = nn.Conv(2, (3, 3), conv_general_dilated=mine)
    x = jnp.ones((1, 4, 4, 1))
    v = layer.init(jax.random.PRNGKey(0), x)
    calls.clear()
    with convs_as_matmuls():
        layer.apply(v, x)
    assert calls == [1]
