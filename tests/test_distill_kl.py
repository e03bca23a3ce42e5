"""distill/kl.py: the overflow-safe tempered KL equals the float64 textbook value where that
is representable, is never NaN for finite logits, and cross-entropy halves exactly."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxopt_lab.distill.kl import half_centred, half_cross_entropy, tempered_kl, textbook_kl

logits = hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(2, 5)),
                    elements=st.floats(-30, 30, width=32))
temperatures = st.sampled_from([0.5, 1.0, 2.0, 4.0, 10.0])


def _kl64(t, s, temperature):
    """T^2 KL(softmax(t/T) || softmax(s/T)) in float64."""
    t, s = np.asarray(t, np.float64) / temperature, np.asarray(s, np.float64) / temperature
    lt = t - t.max(-1, keepdims=True)
    lt = lt - np.log(np.exp(lt).sum(-1, keepdims=True))
    ls = s - s.max(-1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    return temperature**2 * np.sum(np.exp(lt) * (lt - ls), -1)


@given(logits, logits, temperatures)
def test_tempered_kl_is_the_textbook_value_and_nonnegative(t, s, temperature):
    s = np.resize(s, t.shape)
    got = np.asarray(tempered_kl(jnp.asarray(t), jnp.asarray(s), temperature))
    assert got.shape == t.shape[:-1]
    assert (got >= 0).all()
    np.testing.assert_allclose(got, _kl64(t, s, temperature), rtol=1e-3, atol=1e-4)


@given(logits, temperatures)
def test_kl_of_identical_logits_is_zero_and_shift_invariant(t, temperature):
    x = jnp.asarray(t)
    np.testing.assert_allclose(np.asarray(tempered_kl(x, x, temperature)), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(textbook_kl(x, x + 7.0)), 0, atol=1e-5)


def test_gradient_is_hintons_where_finite():
    t = jnp.array([[1.0, -2.0, 0.5]])
    s = jnp.array([[0.3, 0.1, -1.0]])
    temperature = 3.0
    g = jax.grad(lambda s: tempered_kl(t, s, temperature).sum())(s)
    want = temperature * (jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature))
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-6)


@given(st.floats(1e30, 3e38).map(lambda v: float(np.float32(v))), st.sampled_from([1e-3, 0.1, 1.0, 1e3]))
def test_huge_finite_logits_give_finite_or_inf_never_nan(big, temperature):
    t = jnp.array([[big, 0.0, -big]], jnp.float32)
    s = jnp.array([[0.0, big, -big]], jnp.float32)
    out = np.asarray(tempered_kl(t, s, temperature))
    assert not np.isnan(out).any() and (out >= 0).all()
    same = np.asarray(tempered_kl(t, t, temperature))
    np.testing.assert_array_equal(same, 0)
    assert not np.isnan(np.asarray(jax.grad(lambda s: tempered_kl(t, s, temperature).sum())(s))
                        ).any()


def test_nan_and_plus_inf_logits_give_nan_and_minus_inf_is_allowed():
    ok = jnp.array([[0.0, 1.0]])
    assert np.isnan(np.asarray(tempered_kl(jnp.array([[jnp.nan, 1.0]]), ok, 1.0))).all()
    assert np.isnan(np.asarray(tempered_kl(ok, jnp.array([[jnp.inf, 1.0]]), 1.0))).all()
    # A -inf teacher logit is a zero probability: its term contributes 0, not NaN.
    out = tempered_kl(jnp.array([[-jnp.inf, 1.0]]), ok, 2.0)
    np.testing.assert_allclose(np.asarray(out), _kl64([[-1e300, 1.0]], [[0.0, 1.0]], 2.0),
                               rtol=1e-5)


@given(logits)
def test_half_cross_entropy_is_half_the_textbook_value(x):
    labels = np.arange(x.shape[0]) % x.shape[-1]
    want = -np.take_along_axis(np.asarray(jax.nn.log_softmax(x.astype(np.float64))),
                               labels[:, None], -1)[:, 0]
    got = half_cross_entropy(jnp.asarray(labels), jnp.asarray(x))
    np.testing.assert_allclose(2 * np.asarray(got), want, rtol=1e-5, atol=1e-5)
    soft = jax.nn.one_hot(labels, x.shape[-1])
    np.testing.assert_allclose(np.asarray(half_cross_entropy(soft, jnp.asarray(x))),
                               np.asarray(got), rtol=1e-5, atol=1e-6)


def test_half_centred_never_overflows():
    x = jnp.array([[3e38, -3e38, 0.0]], jnp.float32)
    h = np.asarray(half_centred(x))
    assert np.isfinite(h).all() and h.max() == 0.0
