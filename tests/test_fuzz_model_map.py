"""Fuzzing `model_map` (>= 200 examples): random stock layers, both APIs, bad input.

Valid inputs come from their own strategy and must map every kernel with axes that
multiply out (X @ W(K, N) equals the layer's pre-bias output); invalid ones (not a
module, wrong variables) must raise ValueError/TypeError, never return a wrong map.
"""

import _fuzz as fz
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.core.capture import layer_inputs


def _size(*options):
    # Sizes from small fixed palettes (1, where an axis may collapse, and one more): every
    # new shape costs an eager init and a trace (seconds on a loaded CPU) while the property
    # -- which axes multiply out -- is the same for any size, so repeated shapes hit the cache.
    return st.sampled_from(options)


@st.composite
def linen_layers(draw):
    kind = draw(st.sampled_from(["dense", "dense_general", "einsum", "conv", "attention"]))
    b, t, d = draw(_size(1, 2)), draw(_size(1, 3)), draw(_size(1, 4))
    if kind == "dense":
        return nn.Dense(draw(_size(1, 3))), jnp.ones((b, t, d)), ((0,), (1,))
    if kind == "dense_general":
        two = draw(st.booleans())
        feats = (draw(_size(1, 2)), draw(_size(1, 3)))
        x = jnp.ones((b, t, d)) if two else jnp.ones((b, d))
        layer = nn.DenseGeneral(feats, axis=(-2, -1) if two else -1)
        return layer, x, (((0, 1), (2, 3)) if two else ((0,), (1, 2)))
    if kind == "einsum":
        n, h, e = draw(_size(1, 2)), draw(_size(1, 3)), draw(_size(1, 2))
        return nn.Einsum((n, h, e), "btnh,nhe->bte"), jnp.ones((b, t, n, h)), ((0, 1), (2,))
    if kind == "conv":
        c, f = draw(_size(1, 3)), draw(_size(1, 2))
        k = draw(_size(1, 3))
        return nn.Conv(f, (k, k)), jnp.ones((b, 5, 5, c)), ((0, 1, 2), (3,))
    heads = draw(_size(1, 2))
    hd = draw(_size(1, 2))
    layer = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=heads * hd)
    return layer, jnp.ones((b, t, d)), None


@settings(deadline=None)  # the ci profile: 30; HYPOTHESIS_PROFILE=fuzz for 200
@given(linen_layers(), st.integers(0, 2**31 - 1))
def test_model_map_of_random_linen_layers(case, seed):
    layer, x, axes = case
    x = x * jax.random.normal(jax.random.PRNGKey(seed % 1000), x.shape)
    v = layer.init(jax.random.PRNGKey(0), x)
    mm = jol.model_map(layer, v, x)
    kernels = {k: i for k, i in mm.items() if i.role == "kernel"}
    assert kernels, mm.summary()
    if axes is not None:
        info = mm.lookup(("params", "kernel"))
        assert (info.contracting, info.outputs) == axes
    for k, i in mm.items():
        assert set(i.contracting + i.outputs + i.batch) <= set(range(len(i.shape)))
        if k[-1] == "bias":
            assert i.role == "bias"
    _, xs = layer_inputs(layer, v, x)
    assert set(xs) == set(kernels)
    for names, mat in xs.items():
        info = mm[names]
        assert mat.shape[1] == int(np.prod([info.shape[a] for a in info.contracting]))
    fz.checked()  # (counted for benchmarks/fuzz_reach.py)


@settings(deadline=None)  # the ci profile: 30; HYPOTHESIS_PROFILE=fuzz for 200
@given(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just(jnp.ones(3)),
                 st.just(lambda x: x)))
def test_model_map_rejects_what_is_not_a_flax_module(bad):
    with pytest.raises((ValueError, TypeError)):
        jol.model_map(bad, {}, jnp.ones((1, 2)))
    fz.error_checked()


@settings(deadline=None)  # the ci profile: 30; HYPOTHESIS_PROFILE=fuzz for 200
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from(["drop", "extra", "shape"]))
def test_model_map_rejects_variables_that_do_not_fit(d_in, d_out, how):
    layer = nn.Dense(d_out)
    x = jnp.ones((1, d_in))
    v = layer.init(jax.random.PRNGKey(0), x)
    if how == "drop":
        bad = {"params": {"bias": v["params"]["bias"]}}
    elif how == "extra":
        bad = {"params": {**v["params"], "kernel": jnp.ones((d_in + 1, d_out))}}
    else:
        bad = {"params": {**v["params"], "kernel": jnp.ones((d_in, d_out, 2))}}
    with pytest.raises(Exception) as err:  # flax's own ScopeParamShapeError etc.
        jol.model_map(layer, bad, x)
    assert isinstance(err.value, (ValueError, TypeError, KeyError)) or "flax" in type(
        err.value).__module__
    fz.error_checked()


def test_model_map_nnx_random_linear_general():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        d, h, e = (int(v) for v in rng.integers(1, 5, 3))
        m = nnx.LinearGeneral(d, (h, e), rngs=nnx.Rngs(seed))
        info = jol.model_map(m, None, jnp.ones((2, d))).lookup(("kernel",))
        assert (info.contracting, info.outputs) == ((0,), (1, 2))
