"""SmoothQuant: folding keeps a pre-LN float layer's output; scales are finite and checked."""

import doctest
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.oneshot import hessian_accumulate, hessian_init, smooth_layernorm, smooth_scales


class PreLN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="up")(nn.LayerNorm(name="ln")(x))


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_folding_into_the_norm_keeps_the_float_output(seed, alpha):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(12, 6)) * np.exp(rng.uniform(-2, 2, 6)), jnp.float32)
    model = PreLN()
    p = model.init(jax.random.key(seed % 1000), x)["params"]
    p = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), p)
    ln_out = nn.LayerNorm().apply({"params": p["ln"]}, x)
    stats = hessian_accumulate(hessian_init(6), ln_out)
    s = smooth_scales(stats.abs_max, jnp.abs(p["up"]["kernel"]).max(1), alpha=alpha)
    assert bool(jnp.isfinite(s).all() and (s > 0).all())
    ln2, (k2,) = smooth_layernorm(p["ln"], [p["up"]["kernel"]], s)
    p2 = {"ln": ln2, "up": {"kernel": k2, "bias": p["up"]["bias"]}}
    np.testing.assert_allclose(model.apply({"params": p2}, x), model.apply({"params": p}, x),
                               rtol=1e-5, atol=1e-5)
    # With equal weight maxima, max|X_k / s_k| = max|X_k|^(1 - alpha): a flatter range.
    flat = smooth_scales(stats.abs_max, jnp.ones(6), alpha=alpha)
    spread = lambda a: float(a.max() / a.min())  # noqa: E731
    assert spread(stats.abs_max / flat) <= spread(stats.abs_max) * (1 + 1e-5)


def test_zero_channels_and_bad_input():
    s = smooth_scales(jnp.array([0.0, 4.0]), jnp.array([1.0, 0.0]))
    assert s.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="qkv.*alpha"):
        smooth_scales(jnp.ones(2), jnp.ones(2), alpha=1.5, name="qkv")
    with pytest.raises(ValueError, match="qkv.*shape"):
        smooth_scales(jnp.ones(2), jnp.ones(3), name="qkv")
    with pytest.raises(ValueError, match="qkv.*NaN"):
        smooth_scales(jnp.array([jnp.nan, 1.0]), jnp.ones(2), name="qkv")


def test_docstring_examples_run():
    mod = importlib.import_module("jaxopt_lab.oneshot.smoothquant")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0


def test_smooth_with_model_map_keeps_float_model():
    """Model-level SmoothQuant folds into the map's targets only: the float output is
    unchanged, the shared q/k/v norm fold is applied, GELU-fed kernels are reported."""
    import _fold_models as fm
    import jaxopt_lab as jol
    from jaxopt_lab.oneshot import calibration_stats, smooth
    model = fm.PreLN()
    x = jax.random.normal(jax.random.key(3), (4, 8, fm.D))
    v = model.init(jax.random.key(1), x)
    mm = jol.model_map(model, v, x)
    new, how = smooth(v, calibration_stats(model, v, [x]), model_map=mm, alpha=0.5)
    assert how["['params']['attn']['query']['kernel']"].startswith("smoothed into norm")
    assert how["['params']['gelu_out']['kernel']"].startswith("not smoothed: ")
    assert not np.allclose(np.asarray(new["params"]["ln0"]["scale"]),
                           np.asarray(v["params"]["ln0"]["scale"]))
    np.testing.assert_allclose(np.asarray(model.apply(new, x)), np.asarray(model.apply(v, x)),
                               rtol=2e-4, atol=2e-4)
