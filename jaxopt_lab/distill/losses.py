"""Distillation losses: Hinton logit distillation and feature (hint) matching.

Both are plain functions of arrays. Logits are ``(..., C)``: the leading axes are
positions (a batch, or batch x sequence) and the last axis the classes. The loss is
averaged over positions (optionally only the valid ones given by ``mask``), never over
classes or feature channels.

Examples:
  >>> import jax.numpy as jnp, jaxopt_lab as jol
  >>> t = jnp.array([[4.0, 1.0, -2.0]]); s = jnp.array([[3.0, 0.5, -1.0]])
  >>> loss = jol.distill_loss(t, s, temperature=2.0, alpha=0.5, labels=jnp.array([0]))
  >>> bool(loss >= 0)
  True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab._pow2 import pow2_scale
from jaxopt_lab.distill.features import project
from jaxopt_lab.distill.kl import half_cross_entropy, tempered_kl

Projection = None | Mapping[str, Any] | Callable[[jax.Array], jax.Array]


def concrete_float(value: Any, name: str) -> float | None:
    """``value`` as a Python float, or ``None`` when it is traced (checked by the caller)."""
    try:
        arr = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if arr.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(arr)


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_float_array(x: Any, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have rank >= 1 (..., features), got a scalar")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    return x


def _check_mask(mask: Any, positions: tuple[int, ...], name: str) -> jax.Array | None:
    """A mask over the leading (position) axes; a prefix of ``positions`` broadcasts."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.ndim > len(positions) or mask.shape != positions[: mask.ndim]:
        raise ValueError(
            f"mask shape {mask.shape} must equal the {name} position shape {positions} "
            "(or a prefix of it)"
        )
    if not _is_traced(mask) and np.any(np.asarray(mask) < 0):
        raise ValueError(f"mask must be non-negative (bool or weights), got min {mask.min()}")
    return jnp.broadcast_to(
        mask.reshape(mask.shape + (1,) * (len(positions) - mask.ndim)), positions
    )


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over positions with weight ``mask`` (0 when nothing is valid).

    Invalid positions go through ``where`` rather than a product, so a NaN or Inf
    computed at a padded position cannot leak into the result.
    """
    if mask is None:
        mean = jnp.mean(values)
        # Each value is representable but their sum may not be: then sum(values / n).
        return jnp.where(jnp.isfinite(mean), mean, jnp.sum(values / values.size))
    weights = mask.astype(values.dtype)
    valid = weights > 0
    count = jnp.sum(weights)
    safe_count = jnp.where(count > 0, count, 1)
    mean = jnp.sum(jnp.where(valid, values * weights, 0)) / safe_count
    mean = jnp.where(jnp.isfinite(mean), mean,
                     jnp.sum(jnp.where(valid, values * (weights / safe_count), 0)))
    return jnp.where(count > 0, mean, 0)


def _check_labels(labels: Any, logits_shape: tuple[int, ...], valid: jax.Array | None):
    labels = jnp.asarray(labels)
    num_classes = logits_shape[-1]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != logits_shape[:-1]:
            raise ValueError(
                f"integer labels shape {labels.shape} must equal the logits position shape "
                f"{logits_shape[:-1]}"
            )
        if not _is_traced(labels) and (valid is None or not _is_traced(valid)):
            picked = np.asarray(labels)
            if valid is not None:
                picked = picked[np.asarray(valid) > 0]
            if picked.size and (picked.min() < 0 or picked.max() >= num_classes):
                bad = picked.min() if picked.min() < 0 else picked.max()
                raise ValueError(f"label {bad} out of range for {num_classes} classes")
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != logits_shape:
            raise ValueError(
                f"soft labels shape {labels.shape} must equal the logits shape {logits_shape}"
            )
    else:
        raise ValueError(f"labels must be integer classes or float probabilities, got {labels.dtype}")
    return labels


def check_kd_settings(temperature: Any, alpha: Any) -> tuple[bool, bool]:
    """Validates concrete settings; returns ``(needs KL term, needs CE term)``.

    Traced settings (e.g. a temperature schedule under ``jit``) can't be checked and
    count as needing both terms.
    """
    temp = concrete_float(temperature, "temperature")
    if temp is not None and not (np.isfinite(temp) and temp > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    a = concrete_float(alpha, "alpha")
    if a is not None and not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return a is None or a > 0.0, a is None or a < 1.0


def distill_loss(
    teacher_logits: jax.typing.ArrayLike,
    student_logits: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    labels: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Knowledge-distillation loss of Hinton, Vinyals and Dean (2015).

    ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(labels, s)``,
    with the KL summed over classes and both terms averaged over positions. The ``T^2``
    factor keeps the soft-target gradients on the same scale for every temperature. The
    teacher is under ``stop_gradient``; everything is computed from log-softmaxes (in at
    least float32), so logits of any magnitude, and ``-inf`` teacher logits, are fine:
    where ``t / T`` or ``T**2`` would overflow, the same value is computed in logit units
    (see :mod:`jaxopt_lab.distill.kl`), so the loss is finite whenever its true value is
    representable, and ``inf`` (not NaN) when it is not.

    Args:
      teacher_logits: ``(..., C)`` teacher logits, e.g. ``(B, C)`` or ``(B, L, C)``.
      student_logits: student logits of the same shape.
      temperature: softening temperature ``T > 0``.
      alpha: weight of the distillation term, in ``[0, 1]``.
      labels: hard labels ``(...)`` (integers) or soft labels ``(..., C)``; required
        when ``alpha < 1``.
      mask: optional weights (bool or non-negative) over the position axes, e.g.
        ``(B, L)`` for padded sequences; the loss is then the mean per valid position
        and padded positions (their logits and labels) never affect value or gradient.

    Returns:
      The scalar loss (0 when ``mask`` marks nothing valid). Under ``pmap`` it is the
      per-device mean; a step that ``pmean`` s the gradients then averages the devices,
      which is the global per-token mean when devices hold equal numbers of valid tokens.

    Raises:
      ValueError: mismatched shapes or class counts, non-float logits, empty logits,
        ``temperature <= 0`` (or not finite), ``alpha`` outside ``[0, 1]``, labels
        missing when ``alpha < 1``, labels out of range, or a bad mask.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> t = jnp.zeros((2, 5, 3)); s = jnp.ones((2, 5, 3))
      >>> m = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
      >>> float(jol.distill_loss(t, s, temperature=4.0, mask=m))
      0.0
    """
    t = _check_float_array(teacher_logits, "teacher_logits")
    s = _check_float_array(student_logits, "student_logits")
    if t.shape[-1] != s.shape[-1]:
        raise ValueError(f"class count mismatch: teacher has {t.shape[-1]}, student {s.shape[-1]}")
    if t.shape != s.shape:
        raise ValueError(f"logits shape mismatch: teacher {t.shape} vs student {s.shape}")
    need_kd, need_ce = check_kd_settings(temperature, alpha)
    if need_ce and labels is None:
        raise ValueError(f"labels are required when alpha < 1 (got alpha={alpha})")
    valid = _check_mask(mask, s.shape[:-1], "logits")
    if labels is not None:
        labels = _check_labels(labels, s.shape, valid)

    dtype = jnp.result_type(t.dtype, s.dtype, jnp.float32)
    t = jax.lax.stop_gradient(t.astype(dtype))
    s = s.astype(dtype)
    if valid is not None:
        # Double-where: padded positions get harmless inputs so that their (discarded)
        # values can't turn into NaN gradients.
        keep = valid[..., None] > 0
        t, s = jnp.where(keep, t, 0), jnp.where(keep, s, 0)
        if labels is not None:
            labels = jnp.where(keep if labels.ndim == s.ndim else valid > 0, labels, 0)

    per_position = jnp.zeros(s.shape[:-1], dtype)
    if need_kd:
        # T^2 * KL, finite whenever the true value is (no t / T or T**2 overflow).
        per_position = per_position + alpha * tempered_kl(t, s, temperature)
    if need_ce:
        # (halved: finite for any finite logits; doubled only after the 1 - alpha weight)
        per_position = per_position + (1 - alpha) * half_cross_entropy(labels, s) * 2
    return masked_mean(per_position, valid)


def feature_distill_loss(
    teacher_features: jax.typing.ArrayLike,
    student_features: jax.typing.ArrayLike,
    *,
    kind: str = "mse",
    projection: Projection = None,
    mask: jax.typing.ArrayLike | None = None,
    eps: float = 1e-8,
) -> jax.Array:
    """Hint (feature) distillation loss between intermediate activations (FitNets).

    Features are ``(..., D)``: leading axes are positions (batch, spatial, sequence),
    the last axis is channels. The teacher is under ``stop_gradient``. When widths
    differ, ``projection`` (a learnable map, see :func:`init_projection`) takes the
    student's ``D_s`` channels to the teacher's ``D_t``.

    Args:
      teacher_features: ``(..., D_t)`` teacher activations.
      student_features: ``(..., D_s)`` student activations, same position shape.
      kind: ``"mse"`` (mean squared error over channels) or ``"cosine"``
        (``1 - cosine similarity`` over channels, scale-free).
      projection: ``None``, a ``{"kernel": (D_s, D_t), "bias": (D_t,)}`` mapping from
        :func:`init_projection`, or any callable applied to the student features.
      mask: optional non-negative weights over the leading position axes (or a prefix
        of them, e.g. ``(B,)`` for ``(B, H, W, D)`` features).
      eps: floor on the norms for ``"cosine"`` (a zero vector has similarity 0).

    Returns:
      The scalar loss, averaged over (valid) positions.

    Raises:
      ValueError: unknown ``kind``, non-float or empty features, shapes that differ
        after the projection, or a bad mask.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> t = jnp.ones((4, 8)); s = jnp.ones((4, 3))
      >>> proj = jol.distill.init_projection(jax.random.PRNGKey(0), 3, 8)
      >>> float(jol.feature_distill_loss(t, s, kind="cosine", projection=proj)) >= 0
      True
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    t = _check_float_array(teacher_features, "teacher_features")
    s = _check_float_array(student_features, "student_features")
    # The projection maps channels only, so the positions are the student's own.
    valid = _check_mask(mask, s.shape[:-1], "features")
    # Double-where, as in distill_loss: padded positions get harmless inputs, before the
    # projection too, so that an Inf or NaN there cannot turn into a NaN gradient of the
    # student or of the projection's kernel.
    keep = None if valid is None else valid[..., None] > 0
    if keep is not None:
        s = jnp.where(keep, s, 0)
    if projection is not None:
        s = project(projection, s) if isinstance(projection, Mapping) else projection(s)
        s = _check_float_array(s, "projected student_features")
    if t.shape != s.shape:
        hint = "" if projection is not None else "; pass projection=init_projection(...)"
        raise ValueError(
            f"feature shape mismatch: teacher {t.shape} vs student {s.shape}{hint}"
        )
    dtype = jnp.result_type(t.dtype, s.dtype, jnp.float32)
    t = jax.lax.stop_gradient(t.astype(dtype))
    s = s.astype(dtype)
    if keep is not None:
        t, s = jnp.where(keep, t, 0), jnp.where(keep, s, 0)
    if kind == "mse":
        per_position = jnp.mean(jnp.square(s - t), axis=-1)
    else:
        # Clamped: rounding can push the similarity of parallel vectors just above 1.
        per_position = jnp.clip(1 - _cosine(t, s, eps), 0.0, 2.0)
    return masked_mean(per_position, valid)


def _cosine(a: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """``a.b / (max(|a|, eps) max(|b|, eps))`` over the last axis, for any magnitudes.

    Each vector is first scaled by a power of two near its max |entry| (a constant for
    autodiff; the cosine is scale-invariant), so squared norms cannot overflow
    (|x| > ~1e19) or underflow; the ``eps`` floor, scaled alike, still applies to the
    unscaled norm.
    """
    a_hat, eps_a = _unit_max(a, eps)
    b_hat, eps_b = _unit_max(b, eps)
    # Norms through max(., eps^2) inside the sqrt: finite gradients at zero vectors.
    norm_a = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a_hat), -1), jnp.square(eps_a)))
    norm_b = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(b_hat), -1), jnp.square(eps_b)))
    return jnp.sum(a_hat * b_hat, -1) / (norm_a * norm_b)


def _unit_max(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """``x * r`` and ``eps * r`` with ``r = 2**-k``, ``2**k`` just above max|x| per row
    (``jaxopt_lab._pow2.pow2_scale``: not ``1 / max|x|``, which XLA flushes to 0 for
    max|x| > 2**126)."""
    r, _ = pow2_scale(jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1)))
    return x * r[..., None], eps * r
