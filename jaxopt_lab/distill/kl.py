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


def tempered_kl(teacher: jax.Array, student: jax.Array, temperature) -> jax.Array:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per position.

    Args:
      teacher: ``(..., C)`` float logits (already under ``stop_gradient``).
      student: logits of the same shape and dtype.
      temperature: ``T > 0`` (a Python float or a traced scalar).

    Returns:
      ``(...)``: finite wherever the true value is representable and the logits are
      finite or ``-inf``; inf where the true value overflows; NaN for NaN or ``+inf``
      logits.
    """
    def textbook(t, s):
        return temperature * (temperature * textbook_kl(t / temperature, s / temperature))

    ok = jnp.isfinite(jax.lax.stop_gradient(textbook(teacher, student)))
    # Double where: each branch gets harmless inputs in the rows the other one handles,
    # so its (discarded) gradient there cannot be NaN.
    keep = ok[..., None]
    plain = textbook(jnp.where(keep, teacher, 0), jnp.where(keep, student, 0))
    fallback = _logit_units_kl(jnp.where(keep, 0, teacher), jnp.where(keep, 0, student),
                               temperature)
    undefined = jnp.any(jnp.isnan(teacher) | jnp.isnan(student) | (teacher == jnp.inf)
                        | (student == jnp.inf), axis=-1)
    return jnp.where(ok, plain, jnp.where(undefined, jnp.nan, fallback))


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
