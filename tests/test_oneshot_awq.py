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


# --- the model-level entry point: folds from the model map --------------------------------

def _awq_models():
    import flax.linen as nn
    import jax

    import _fold_models as tf
    return nn, jax, tf


def _calibrated(model):
    nn, jax, tf = _awq_models()
    from jaxopt_lab.oneshot import calibration_stats
    x = jax.random.normal(jax.random.key(3), (4, 8, tf.D)) * jnp.exp(
        jax.random.uniform(jax.random.key(4), (tf.D,), minval=-2, maxval=2))[None, None, :]
    v = model.init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
    return x, v, jol.model_map(model, v, x), calibration_stats(model, v, [x])


def test_awq_map_equals_hand_fold_on_minilm_block():
    """The bench's hand-picked AWQ (attn_out's scale folded into value, the rest explicit)
    and `awq` with the model map give the same quantized model."""
    from jaxopt_lab.oneshot import awq, fold_scale_into_dense
    nn, jax, tf = _awq_models()
    model = tf.PostLN()
    x, v, mm, stats = _calibrated(model)
    g = 4
    bp = v["params"]
    st_ = {k[-2]: s for k, s in stats.items()}
    out, res = dict(bp), {}
    for k in ("attn_out", "query", "key", "value", "intermediate", "output"):
        w = out[k]["kernel"]
        res[k] = awq_matrix(w, st_[k].xtx, st_[k].abs_sum / st_[k].count, bits=4,
                            group_size=g, name=k)
        if k == "attn_out":
            out[k] = {**bp[k], "kernel": res[k].qtensor}
            out["value"] = fold_scale_into_dense(bp["value"], res[k].scales, name="value")
        else:
            out[k] = {**out[k], "kernel": res[k].effective}
    hand = jol.dequantize(out)
    got = awq(bp, stats, model_map=mm, bits=4, group_size=g)
    assert got.how["['attn_out']['kernel']"].startswith("folded into kernel params/value/")
    assert got.how["['query']['kernel']"].startswith("explicit: ")
    assert type(got.params["attn_out"]["kernel"]).__name__ == "QTensor"
    y_hand = model.apply({"params": hand}, x)
    y_map = model.apply({"params": jol.dequantize(got.params)}, x)
    np.testing.assert_allclose(np.asarray(y_map), np.asarray(y_hand), rtol=1e-5, atol=1e-5)
    # Without the map every scale is explicit (the float model's function is kept too).
    plain = awq(bp, stats, bits=4, group_size=g)
    assert all(h.startswith("explicit: ") for h in plain.how.values())


def test_awq_shared_norm_target_preln():
    """q, k, v after one LayerNorm share one scale folded into it; the output matches the
    explicit form ((x / s) @ Q(s W)) computed by hand, and beats nothing-folded RTN error."""
    from jaxopt_lab.oneshot import awq
    nn, jax, tf = _awq_models()
    model = tf.PreLN()
    x, v, mm, stats = _calibrated(model)
    got = awq(v, stats, model_map=mm, bits=4, group_size=4)
    sq = got.scales["['params']['attn']['query']['kernel']"]
    sk = got.scales["['params']['attn']['key']['kernel']"]
    np.testing.assert_array_equal(np.asarray(sq), np.asarray(sk))
    assert "shared with" in got.how["['params']['attn']['query']['kernel']"]
    assert got.how["['params']['gelu_out']['kernel']"].startswith("explicit: ")
    assert got.how["['params']['relu_out']['kernel']"].startswith("folded into kernel")
    ln = got.params["params"]["ln0"]["scale"]
    np.testing.assert_allclose(np.asarray(ln), np.asarray(v["params"]["ln0"]["scale"] / sq),
                               rtol=1e-6)
    y = model.apply(jol.dequantize(got.params), x)
    y0 = model.apply(v, x)
    rtn = jol.quantize(v, bits=4, granularity="group", group_size=4, model_map=mm)
    y_rtn = model.apply(jol.dequantize(rtn), x)
    assert float(jnp.linalg.norm(y - y0)) <= 1.05 * float(jnp.linalg.norm(y_rtn - y0))


def test_awq_where_subset_keeps_group_exact():
    """Selecting only q of a shared q/k/v target: k and v take s in float (exact)."""
    from jaxopt_lab.oneshot import awq
    nn, jax, tf = _awq_models()
    model = tf.PreLN()
    x, v, mm, stats = _calibrated(model)
    q_only = lambda path, leaf: jax.tree_util.keystr(path).endswith("['query']['kernel']")  # noqa: E731
    got = awq(v, stats, model_map=mm, bits=8, where=q_only)
    assert list(got.how) == ["['params']['attn']['query']['kernel']"]
    # 8-bit q alone: the output barely moves, so k and v were compensated exactly.
    y = model.apply(jol.dequantize(got.params), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model.apply(v, x)), rtol=0.05,
                               atol=0.05)
