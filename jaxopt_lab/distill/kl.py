"""Overflow-safe softmax losses: the ``T^2``-scaled KL of tempered softmaxes, and CE.

``T^2 * KL(softmax(t / T) || softmax(s / T))`` written the textbook way overflows float32
for perfectly finite inputs: ``t / T`` (huge logits with a small ``T``: then ``-inf``
student log-probabilities meet positive teacher probabilities and the KL is inf, though
``T^2`` brings the true value back into range) and ``T**2`` itself (huge ``T``:
``inf * 0 = NaN``). :func:`tempered_kl` keeps the textbook computation, and with it the
exact Hinton gradient ``T * (softmax(s/T) - softmax(t/T))``, wherever it is finite, and
elsewhere switches to the same quantity in logit units,

  ``T * E_pt[d_t - d_s] + T^2 * (lse(d_s / T) - lse(d_t / T))``,  ``d = x - max(x)``,

computed from half logits (``x/2 - max(x)/2`` cannot overflow) with the log-sum-exps in
``[0, log C]``. It is inf only when the true value is beyond the dtype's range.
:func:`half_cross_entropy` uses the same half logits for the hard/soft-label term.

Examples:
  >>> import jax.numpy as jnp
  >>> from jaxopt_lab.distill.kl import tempered_kl
  >>> t, s = jnp.array([[1e36, 0.0]]), jnp.array([[0.0, 1e36]])
  >>> bool(jnp.isclose(tempered_kl(t, s, 1e-3)[0], 1e33))  # T^2 * (1e36 / T) = T * 1e36
  True
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def textbook_kl(teacher: jax.Array, student: jax.Array) -> jax.Array:
    """KL(softmax(teacher) || softmax(student)) summed over the last axis.

    Terms with teacher probability 0 contribute exactly 0 (the xlogy convention), so
    ``-inf`` or hugely negative teacher logits never produce ``0 * inf = NaN``; a NaN
    teacher probability still propagates (``NaN == 0`` is false).
    """
    log_pt = jax.nn.log_softmax(teacher, axis=-1)
    log_ps = jax.nn.log_softmax(student, axis=-1)
    pt = jnp.exp(log_pt)
    kl = jnp.sum(jnp.where(pt == 0, 0, pt * (log_pt - log_ps)), axis=-1)
    # KL >= 0 in exact arithmetic; rounding of nearly equal log-probs can dip below.
    return jnp.maximum(kl, 0)


def half_centred(x: jax.Array) -> jax.Array:
    """``(x - max x) / 2`` per row, without overflow (the max gets no gradient, as in
    ``log_softmax``: the KL is shift-invariant)."""
    top = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return x * 0.5 - top * 0.5


def _logit_units_kl(teacher: jax.Array, student: jax.Array, temperature) -> jax.Array:
    """``T^2 * KL`` per position, from half logits (see the module docstring)."""
    ht, hs = half_centred(teacher), half_centred(student)
    log_pt = jax.nn.log_softmax(ht / temperature * 2, axis=-1)  # max entry exactly 0
    pt = jnp.exp(log_pt)
    lse_t = jax.nn.logsumexp(ht / temperature * 2, axis=-1)
    lse_s = jax.nn.logsumexp(hs / temperature * 2, axis=-1)
    linear = jnp.sum(jnp.where(pt == 0, 0, pt * (ht - hs)), axis=-1) * temperature * 2
    total = linear + temperature * (temperature * (lse_s - lse_t))
    # Only used where the textbook form overflowed, so the linear term dominates: a
    # non-finite total (inf, inf - inf) means the true value is beyond the range.
    return jnp.where(jnp.isfinite(total) & (linear != jnp.inf), jnp.maximum(total, 0), jnp.inf)


# g(x) = (exp(-x) - 1 + x) / x**2 = sum_k (-x)**k / (k + 2)!: the series up to |x| = 1/2
# (its 10th term is below float64's epsilon there), the closed form beyond, where its
# cancellation costs at most a few ulps.
_G_SERIES = [1.0 / math.factorial(k + 2) for k in range(14)]
_G_SERIES_UPTO = 0.5


def _g(x: jax.Array) -> jax.Array:
    small = jnp.abs(x) <= _G_SERIES_UPTO
    xs = jnp.where(small, x, 0.0)
    series = jnp.zeros_like(x)
    for c in reversed(_G_SERIES):
        series = series * -xs + c
    xl = jnp.where(small, 1.0, x)
    return jnp.where(small, series, (jnp.expm1(-xl) + xl) / (xl * xl))


def _log1p_ratio(y: jax.Array) -> jax.Array:
    """``log1p(y) / y`` for ``y >= 0``, accurate (and 1) as ``y -> 0``."""
    small = y < 1e-3
    ys = jnp.where(small, y, 0.0)
    yl = jnp.where(small, 1.0, y)
    return jnp.where(small, 1 - ys * (0.5 - ys * (1 / 3 - ys * 0.25)), jnp.log1p(yl) / yl)


# The log-ratio form needs x = D / T with x**2 finite in float32.
MAX_RATIO = 1e18
# Below -_TAIL, exp(-x) dominates phi(x) and is taken in log space.
_TAIL = 20.0


def _log_phi(x: jax.Array) -> jax.Array:
    """``log(exp(-x) - 1 + x)``, floored at ``log(1e-30)`` (``phi(0) = 0``) so that its
    gradient stays finite; only used where the total is above 1, so the floor is moot."""
    tail = x < -_TAIL
    xn = jnp.where(tail, 0.0, x)
    xt = jnp.where(tail, x, -2 * _TAIL)
    near = jnp.log(jnp.maximum(xn * xn * _g(xn), 1e-30))
    return jnp.where(tail, -xt + jnp.log1p((xt - 1) * jnp.exp(xt)), near)


def ratio_kl(teacher: jax.Array, student: jax.Array, temperature) -> jax.Array:
    """``T^2 * KL`` per position without cancellation, for finite logits and ``|D| / T``
    below ``MAX_RATIO``.

    With ``d = t - s``, ``D = d - E_pt[d]`` (``pt = softmax(t / T)``) and
    ``x = D / T``, the KL is exactly ``log E_pt[exp(-x)] = log1p(y)`` with
    ``y = E_pt[phi(x)]``, ``phi(x) = exp(-x) - 1 + x = x^2 g(x) >= 0``: a sum of
    non-negative terms, so nothing cancels (the textbook form subtracts log-probabilities
    much larger than the KL). For ``y <= 1``

      ``T^2 * KL = E_pt[D^2 g(D / T)] * log1p(y) / y``,

    every factor O(1) however large ``T`` is: as ``T -> inf`` the value tends to
    ``Var_uniform(t - s) / 2`` (``g(0) = 1/2``), where the textbook difference of two
    nearly equal log-probabilities, ``O(1/T)`` each, scaled by ``T^2``, is rounding
    noise (at ``T = 1e6`` in float32, all of it). For ``y > 1`` it is
    ``T^2 * softplus(logsumexp(log pt + log phi(x)))``, in log space so that a huge
    ``exp(-x)`` on an improbable class cannot overflow. Differences are taken of half
    logits, each side centred on its max, so neither overflow nor a common offset rounds
    away the differences that make up ``D``.
    """
    log_pt = jax.nn.log_softmax(half_centred(teacher) / temperature * 2, axis=-1)
    pt = jnp.exp(log_pt)
    half = half_centred(teacher) - half_centred(student)
    half = half - jnp.sum(pt * half, axis=-1, keepdims=True)  # D / 2
    x = half / temperature * 2
    log_terms = log_pt + _log_phi(x)
    la = jax.nn.logsumexp(log_terms, axis=-1)  # log y
    small = la <= 0
    # y <= 1: the D^2 form (no T^2 * tiny underflow); tail classes as T^2 * pt * phi.
    tail = x < -_TAIL
    xs = jnp.where(tail, 0.0, x)
    tail_terms = jnp.exp(jnp.where(tail & small[..., None], log_terms, -jnp.inf))
    mean = (jnp.sum(jnp.where(tail, 0.0, pt * (half * half) * _g(xs)), axis=-1) * 4
            + temperature * (temperature * jnp.sum(tail_terms, axis=-1)))
    scaled = mean * _log1p_ratio(jnp.exp(jnp.where(small, la, -jnp.inf)))
    direct = temperature * (temperature * jax.nn.softplus(jnp.where(small, 1.0, la)))
    return jnp.maximum(jnp.where(small, scaled, direct), 0)


def tempered_kl(teacher: jax.Array, student: jax.Array, temperature) -> jax.Array:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per position.

    Three exact formulations, each used where it is accurate: :func:`ratio_kl` for
    finite logits whose ``t - s`` spreads less than ``MAX_RATIO * T`` (nearly always;
    it has no cancellation, where the textbook form loses digits whenever the KL is
    small next to the log-probabilities, e.g. all of them at ``T = 1e6``), else the
    textbook form where it is finite, and the logit-unit form where that overflows.

    Args:
      teacher: ``(..., C)`` float logits (already under ``stop_gradient``).
      student: logits of the same shape and dtype.
      temperature: ``T > 0`` (a Python float or a traced scalar).

    Returns:
      ``(...)``: finite wherever the true value is representable and the logits are
      finite or ``-inf``; inf where the true value overflows; NaN for NaN or ``+inf``
      logits, and NaN everywhere for a traced temperature that is not finite and
      positive (``0`` under ``jit``: a loud NaN loss, not a plausible number; concrete
      temperatures are rejected by :func:`~jaxopt_lab.distill_loss` with ``ValueError``).
    """
    def textbook(t, s):
        # Centred first: a common offset divided by a small T would round away the
        # differences (the KL is shift-invariant, so only rounding changes).
        t, s = half_centred(t) / temperature * 2, half_centred(s) / temperature * 2
        return temperature * (temperature * textbook_kl(t, s))

    finite_logits = jnp.all(jnp.isfinite(teacher) & jnp.isfinite(student), axis=-1)
    half = half_centred(teacher) - half_centred(student)
    spread = (jnp.max(half, axis=-1) - jnp.min(half, axis=-1)) * 2  # range of t - s >= |D|
    near = jax.lax.stop_gradient(finite_logits & (spread <= temperature * MAX_RATIO))
    ok = ~near & jnp.isfinite(jax.lax.stop_gradient(textbook(teacher, student)))
    # Double where: each branch gets harmless inputs in the rows another one handles,
    # so its (discarded) gradient there cannot be NaN.
    keep, keep_near = ok[..., None], near[..., None]
    close = ratio_kl(jnp.where(keep_near, teacher, 0), jnp.where(keep_near, student, 0),
                            temperature)
    plain = textbook(jnp.where(keep, teacher, 0), jnp.where(keep, student, 0))
    other = keep | keep_near
    fallback = _logit_units_kl(jnp.where(other, 0, teacher), jnp.where(other, 0, student),
                               temperature)
    undefined = jnp.any(jnp.isnan(teacher) | jnp.isnan(student) | (teacher == jnp.inf)
                        | (student == jnp.inf), axis=-1)
    out = jnp.where(near, close, jnp.where(ok, plain, jnp.where(undefined, jnp.nan, fallback)))
    bad_temperature = ~(jnp.isfinite(temperature) & (temperature > 0))
    return jnp.where(bad_temperature, jnp.nan, out)


def half_cross_entropy(labels: jax.Array, logits: jax.Array) -> jax.Array:
    """Half the cross-entropy ``-sum(labels * log_softmax(logits))`` per position.

    Halved so that it stays finite for any finite logits (``logits - max`` alone can
    overflow): the caller multiplies by ``2`` after its weight ``1 - alpha``. Computed as
    ``lse * sum(labels) / 2 - sum(labels * (x - max) / 2)``, which for normal logits is
    the textbook value (halving is exact) with the same gradient.

    Args:
      labels: integer classes ``(...)`` or soft labels ``(..., C)``.
      logits: ``(..., C)`` float logits.
    """
    half = half_centred(logits)
    lse = jax.nn.logsumexp(half * 2, axis=-1)  # in [0, log C]: the max entry is 0
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return lse * 0.5 - jnp.take_along_axis(half, labels[..., None], axis=-1)[..., 0]
    picked = jnp.sum(jnp.where(labels == 0, 0, labels * half), axis=-1)
    return lse * 0.5 * jnp.sum(labels, axis=-1) - picked
