"""The numerics of folding one BatchNorm into the linear layer that feeds it.

Everything here is host-side float64 arithmetic on NumPy copies, rounded once to the
parameters' own dtypes, so folding adds at most one rounding per weight. The BatchNorm is
left as an *exact* identity-plus-shift: ``mean`` 0 (or ``-shift``), ``var`` chosen so that
``var + eps`` rounds to exactly 1 in the dtype the BatchNorm adds them in, ``scale`` 1.
Because ``rsqrt(1) == 1`` and ``(x - 0) * 1 == x`` bit for bit, the unchanged model computes
``x + shift`` and nothing else; and a second fold multiplies by exactly 1 (a no-op).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

# Where the shift ``beta + (b - mu) * g / sqrt(v + eps)`` ends up.
SHIFT_IN_LAYER = "layer_bias"  # the layer has a bias: the BatchNorm becomes x -> x
SHIFT_IN_BN_BIAS = "bn_bias"  # no layer bias, BatchNorm has one: x -> x + bias
SHIFT_IN_BN_MEAN = "bn_mean"  # neither has a bias: x -> x - mean, with mean = -shift


class FoldInputs(NamedTuple):
    """The arrays of one layer/BatchNorm pair (``None`` where a parameter does not exist).

    ``scale``, ``beta``, ``mean`` and ``var`` have the BatchNorm's feature shape;
    ``kernel_shape`` / ``bias_shape`` are shapes that a BatchNorm-shaped array is reshaped
    to (same element order, ones inserted) to broadcast against the kernel and the bias.
    """

    kernel: Any
    bias: Any
    mean: Any
    var: Any
    scale: Any
    beta: Any
    epsilon: float
    stat_dtype: Any  # dtype in which the BatchNorm computes ``var + epsilon``
    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]


class FoldOutputs(NamedTuple):
    """New values for the pair; ``None`` where the input had no such parameter."""

    kernel: np.ndarray
    bias: np.ndarray | None
    mean: np.ndarray
    var: np.ndarray
    scale: np.ndarray | None
    beta: np.ndarray | None
    shift_in: str


def identity_variance(epsilon: float, dtype: Any) -> np.generic:
    """A variance ``v`` with ``v + epsilon == 1`` exactly when added in ``dtype``.

    Raises:
      ValueError: if no such value exists in ``dtype`` (``epsilon`` far outside (0, 1)).
    """
    dtype = np.dtype(dtype)
    eps = np.asarray(epsilon, dtype)
    one = np.asarray(1, dtype)
    v = np.asarray(1 - float(epsilon), dtype)
    # Rounding 1 - eps and then adding eps may miss 1 by an ulp; walk to a value that hits it.
    for _ in range(8):
        total = (v + eps).astype(dtype)
        if total == one:
            return v[()]
        v = np.nextafter(v, -np.inf if total > one else np.inf).astype(dtype)
    raise ValueError(f"no variance v with v + epsilon == 1 in {dtype} for epsilon={epsilon!r}")


def is_identity(mean, var, scale, epsilon: float, stat_dtype: Any) -> bool:
    """True when a BatchNorm with these statistics computes ``x - mean (+ bias)`` exactly."""
    dt = np.dtype(stat_dtype)
    total = np.asarray(var).astype(dt) + np.asarray(epsilon, dt)
    ok = bool(np.all(total == 1)) and bool(np.all(np.isfinite(np.asarray(mean))))
    return ok and (scale is None or bool(np.all(np.asarray(scale) == 1)))


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def channel_multiplier(var, scale, epsilon: float, stat_dtype: Any) -> np.ndarray:
    """``g / sqrt(v + eps)`` in float64, with ``v + eps`` rounded as the BatchNorm rounds it.

    Raises:
      ValueError: (message without the path; callers add it) if ``v + eps`` is not a
        positive finite number or ``g`` is not finite.
    """
    dt = np.dtype(stat_dtype)
    denom = np.asarray(var).astype(dt) + np.asarray(epsilon, dt)
    bad = ~np.isfinite(denom) | (denom <= 0)
    if np.any(bad):
        raise ValueError(
            f"var + epsilon must be positive and finite, got {np.asarray(var)[bad][:4]!r} "
            f"(+ {epsilon!r})"
        )
    g = np.ones_like(denom, np.float64) if scale is None else _f64(scale)
    if not np.all(np.isfinite(g)):
        raise ValueError(f"scale must be finite, got {g[~np.isfinite(g)][:4]!r}")
    return g / np.sqrt(_f64(denom))


def _cast(name: str, values: np.ndarray, dtype) -> np.ndarray:
    """``values`` (float64) rounded to ``dtype``; a finite value beyond its range raises.

    Folding multiplies by ``g / sqrt(v + eps)``, which can push a weight past the
    parameters' dtype (float16 with a large BatchNorm gain, say) although the unfolded
    model is finite; silently storing inf there would break the model.
    """
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(dtype)
    over = np.isfinite(values) & ~np.isfinite(out)
    if np.any(over):
        raise ValueError(
            f"folded {name} overflows {dtype.name}: {values[over][:4]!r} is beyond its "
            f"largest value {float(jnp.finfo(dtype).max)!r}; fold in a wider dtype"
        )
    return out


def fold(a: FoldInputs) -> FoldOutputs:
    """Folds ``a``: ``W' = W * m``, ``b' = beta + (b - mu) * m`` with ``m = g / sqrt(v + eps)``.

    Raises:
      ValueError: for non-finite statistics or ``var + eps <= 0`` (``g = 0`` is fine: the
        channel's kernel becomes 0 and its output the constant ``beta``), or a folded
        value beyond the range of its dtype.
    """
    mean = _f64(a.mean)
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"mean must be finite, got {mean[~np.isfinite(mean)][:4]!r}")
    m = channel_multiplier(a.var, a.scale, a.epsilon, a.stat_dtype)
    beta = np.zeros_like(m) if a.beta is None else _f64(a.beta)
    if not np.all(np.isfinite(beta)):
        raise ValueError(f"bias must be finite, got {beta[~np.isfinite(beta)][:4]!r}")
    kernel = _cast("kernel", _f64(a.kernel) * m.reshape(a.kernel_shape),
                   np.asarray(a.kernel).dtype)

    stat_dt = np.asarray(a.var).dtype
    zeros = np.zeros(m.shape, np.asarray(a.mean).dtype)
    var = np.full(m.shape, identity_variance(a.epsilon, a.stat_dtype), stat_dt)
    scale = None if a.scale is None else np.ones(m.shape, np.asarray(a.scale).dtype)
    new_beta = None if a.beta is None else np.zeros(m.shape, np.asarray(a.beta).dtype)

    if a.bias is not None:
        b = _f64(a.bias)
        shifted = beta.reshape(a.bias_shape) + (b - mean.reshape(a.bias_shape)) * m.reshape(
            a.bias_shape
        )
        bias = _cast("bias", np.broadcast_to(shifted, b.shape), np.asarray(a.bias).dtype)
        return FoldOutputs(kernel, bias, zeros, var, scale, new_beta, SHIFT_IN_LAYER)
    shift = beta + (0.0 - mean) * m
    if a.beta is not None:
        new_beta = _cast("BatchNorm bias (shift)", shift, np.asarray(a.beta).dtype)
        return FoldOutputs(kernel, None, zeros, var, scale, new_beta, SHIFT_IN_BN_BIAS)
    # (x - (-shift)) == x + shift exactly, so the mean can carry the shift.
    new_mean = _cast("BatchNorm mean (-shift)", -shift, np.asarray(a.mean).dtype)
    return FoldOutputs(kernel, None, new_mean, var, scale, None, SHIFT_IN_BN_MEAN)
