"""AWQ: never worse than round-to-nearest on the calibration inputs (the grid holds a = 0),
effective weights equal Q(sW)/s, errors naming the layer."""

import doctest
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.oneshot import awq_matrix

K, N = 16, 6


def _data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, K)) * np.exp(rng.uniform(-2, 2, K))
    return x.astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)


@pytest.mark.parametrize("bits,g,sym", [(4, 8, True), (3, None, False), (8, 4, True)])
@given(seed=st.integers(0, 2**31 - 1))
def test_never_worse_than_rtn(bits, g, sym, seed):
    x, w = _data(seed)
    r = awq_matrix(w, x.T @ x, np.abs(x).mean(0), bits=bits, group_size=g, symmetric=sym)
    gran = "channel" if g is None else "group"
    rtn = jol.dequantize(jol.quantize(jnp.asarray(w), bits=bits, granularity=gran,
                                      group_size=g, symmetric=sym))
    x64 = x.astype(np.float64)
    err = lambda v: np.linalg.norm(x64 @ (w - np.asarray(v, np.float64)))  # noqa: E731
    assert err(r.effective) <= err(rtn) * (1 + 1e-4) + 1e-6
    np.testing.assert_allclose(r.effective, r.qtensor.dequantize() / r.scales[:, None],
                               rtol=1e-6)
    if float(r.alpha) == 0.0:
        np.testing.assert_array_equal(r.effective, rtn)


def test_bad_input_names_the_layer():
    x, w = _data(0)
    with pytest.raises(ValueError, match="L.*group_size=5"):
        awq_matrix(w, x.T @ x, np.abs(x).mean(0), group_size=5, name="L")
    with pytest.raises(ValueError, match="L.*NaN"):
        awq_matrix(w, x.T @ x, np.full(K, np.nan), name="L")
    with pytest.raises(ValueError, match="L.*activation means"):
        awq_matrix(w, x.T @ x, np.ones(K + 1), name="L")


def test_docstring_examples_run():
    mod = importlib.import_module("jaxopt_lab.oneshot.awq")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0


@given(seed=st.integers(0, 2**31 - 1))
def test_folded_into_previous_dense_equals_explicit_scale(seed):
    """Value projection -> attention mix -> output kernel: folding 1/s into the value
    kernel's columns and bias gives the output of the explicit x / s form."""
    from jaxopt_lab.oneshot import fold_scale_into_dense

    rng = np.random.default_rng(seed)
    t = 5
    x = rng.normal(size=(t, 8)).astype(np.float32)
    attn = rng.dirichlet(np.ones(t), size=t).astype(np.float32)  # rows of a softmax
    v = {"kernel": rng.normal(size=(8, K)).astype(np.float32),
         "bias": rng.normal(size=K).astype(np.float32)}
    ctx = attn @ (x @ v["kernel"] + v["bias"])
    wo = rng.normal(size=(K, N)).astype(np.float32)
    r = awq_matrix(wo, ctx.T @ ctx, np.abs(ctx).mean(0), bits=4, group_size=8)
    explicit = ctx @ np.asarray(r.effective)
    v2 = fold_scale_into_dense(v, r.scales)
    folded = (attn @ (x @ np.asarray(v2["kernel"]) + np.asarray(v2["bias"]))) @ np.asarray(
        r.qtensor.dequantize())
    np.testing.assert_allclose(folded, explicit, rtol=1e-4, atol=1e-4 * np.abs(explicit).max())


@given(seed=st.integers(0, 2**31 - 1))
def test_folded_into_norm_equals_explicit_scale(seed):
    from jaxopt_lab.oneshot import fold_scale_into_norm

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, K)).astype(np.float32)
    ln = {"scale": rng.uniform(0.5, 2, K).astype(np.float32),
          "bias": rng.normal(size=K).astype(np.float32)}
    norm = lambda p: (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True) * np.asarray(  # noqa: E731
        p["scale"]) + np.asarray(p["bias"])
    w = rng.normal(size=(K, N)).astype(np.float32)
    z = norm(ln)
    r = awq_matrix(w, z.T @ z, np.abs(z).mean(0), bits=4, group_size=8)
    explicit = z @ np.asarray(r.effective)
    folded = norm(fold_scale_into_norm(ln, r.scales)) @ np.asarray(r.qtensor.dequantize())
    np.testing.assert_allclose(folded, explicit, rtol=1e-4, atol=1e-4 * np.abs(explicit).max())


def test_fold_rejects_bad_scales():
    from jaxopt_lab.oneshot import fold_scale_into_dense, fold_scale_into_norm

    with pytest.raises(ValueError, match="V.*positive"):
        fold_scale_into_dense({"kernel": np.ones((2, 3))}, np.array([1.0, 0.0, 1.0]), name="V")
    with pytest.raises(ValueError, match="LN.*3 channels"):
        fold_scale_into_norm({"scale": np.ones(3)}, np.ones(2), name="LN")
