"""T^2-scaled tempered KL (distill.kl): exact at every temperature, against mpmath."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.distill.kl import tempered_kl

mpmath = pytest.importorskip("mpmath")


def _mp_log_softmax(v, temperature):
    top = max(v)
    lse = top / temperature + mpmath.log(sum(mpmath.exp((x - top) / temperature) for x in v))
    return [x / temperature - lse for x in v]


def mp_tempered_kl(t, s, temperature):
    """T^2 KL(softmax(t/T) || softmax(s/T)) and its student gradient, at 60 digits."""
    with mpmath.workdps(60):
        t = [mpmath.mpf(float(x)) for x in t]
        s = [mpmath.mpf(float(x)) for x in s]
        temp = mpmath.mpf(float(temperature))
        lt, ls = _mp_log_softmax(t, temp), _mp_log_softmax(s, temp)
        value = temp**2 * sum(mpmath.exp(a) * (a - b) for a, b in zip(lt, ls))
        grad = [temp * (mpmath.exp(b) - mpmath.exp(a)) for a, b in zip(lt, ls)]
        return float(value), np.asarray([float(g) for g in grad])


_kl = jax.jit(lambda t, s, temp: tempered_kl(t, s, temp))
_grad = jax.jit(jax.grad(lambda s, t, temp: tempered_kl(t, s, temp).sum()))


@pytest.mark.parametrize("temperature", [1e6, 1e10, 1e20, 3e38])
def test_reported_large_temperatures_give_the_limit(temperature):
    # issue 17: 119210.66 at T=1e6 and 0.0 at T=1e10; the true value tends to
    # Var(t - s) / 2 = 4/3 as T grows.
    t, s = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    value = float(jol.distill_loss(t, s, temperature=temperature))
    np.testing.assert_allclose(value, mp_tempered_kl([0, 1, 2], [2, 1, 0], temperature)[0],
                               rtol=1e-6)
    np.testing.assert_allclose(value, 4 / 3, rtol=1e-6)


_logits = st.lists(st.floats(-50, 50, width=32), min_size=2, max_size=12)


@given(_logits, st.data(), st.floats(-2, 30), st.floats(-1e3, 1e3, width=32))
def test_matches_mpmath_at_every_temperature(t, data, log_temperature, offset):
    s = data.draw(st.lists(st.floats(-50, 50, width=32), min_size=len(t), max_size=len(t)))
    temperature = np.float32(10.0**log_temperature)
    tt = np.asarray(t, np.float32)[None]
    ss = (np.asarray(s, np.float32) + np.float32(offset))[None]  # KL is shift-invariant
    want, want_grad = mp_tempered_kl(tt[0], ss[0], temperature)
    got = float(_kl(tt, ss, temperature)[0])
    # float32 inputs: a few hundred ulps of the logits' own rounding, relative.
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-30)
    got_grad = np.asarray(_grad(ss, tt, temperature))[0]
    scale = np.abs(want_grad).max() + 1e-30
    np.testing.assert_allclose(got_grad / scale, want_grad / scale, atol=2e-4)


def test_limit_series_next_order():
    # T^2 KL = Var(d)/2 + (E[t~ d~^2]/2 - E[d~^3]/6) / T + O(T^-2), d = t - s (uniform
    # moments of the centred values): the near-uniform form follows the series.
    t, s = np.array([0.0, 3.0, 1.0, -2.0]), np.array([1.0, -1.0, 0.5, 2.0])
    d = (t - s) - (t - s).mean()
    tc = t - t.mean()
    for temperature in (1e3, 1e4):
        series = (d**2).mean() / 2 + ((tc * d**2).mean() / 2 - (d**3).mean() / 6) / temperature
        got = float(_kl(t[None].astype(np.float32), s[None].astype(np.float32), temperature)[0])
        np.testing.assert_allclose(got, series, rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0, np.inf, np.nan])
def test_traced_bad_temperature_is_nan_not_a_number(temperature):
    t, s = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    loss = jax.jit(lambda temp: jol.distill_loss(t, s, temperature=temp))(temperature)
    assert np.isnan(float(loss))
    with pytest.raises(ValueError, match="temperature"):
        jol.distill_loss(t, s, temperature=float(temperature))
