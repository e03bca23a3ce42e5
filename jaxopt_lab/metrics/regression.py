"""Regression metrics: MAE, MAPE, RMSE (sklearn's) and Pearson's r (scipy's ``pearsonr``).

MAE, MAPE and RMSE accept ``(N,)`` or ``(N, K)`` targets and reduce over samples per
output like sklearn; ``axis_name`` sums the per-device sufficient statistics, so a
``pmap``/``shard_map`` over sample shards returns the metric of the whole batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxopt_lab._pow2 import pow2_scale
from jaxopt_lab.metrics import _checks

# sklearn's mean_absolute_percentage_error divides by max(|y_true|, float64 eps), also in
# float32, so a zero target gives a huge (finite) error rather than inf.
_MAPE_EPS = float(np.finfo(np.float64).eps)
_MULTIOUTPUT = ("raw_values", "uniform_average")

_ARGS_DOC = """Args:
      y_true: ``(N,)`` or ``(N, K)`` targets.
      y_pred: predictions of the same shape.
      sample_weight: optional ``(N,)`` non-negative weights.
      multioutput: ``"uniform_average"`` (mean over the ``K`` outputs), ``"raw_values"``
        (a ``(K,)`` array; ``(1,)`` for 1-D inputs) or a ``(K,)`` array of output weights.
      axis_name: a ``pmap``/``shard_map`` axis over which the samples are split.

    Returns:
      A scalar, or ``(K,)`` for ``multioutput="raw_values"``.

    Raises:
      ValueError: for shape mismatches, empty inputs, ranks other than 1 or 2, NaN/Inf,
        weights that are negative or sum to zero (value checks only on concrete inputs),
        or a bad ``multioutput``.
"""


def _regression_inputs(y_true, y_pred, sample_weight):
    y_true = _checks.as_array("y_true", y_true, (1, 2))
    y_pred = _checks.as_array("y_pred", y_pred, (1, 2))
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    _checks.check_finite("y_true", y_true)
    _checks.check_finite("y_pred", y_pred)
    weight = _checks.sample_weights(sample_weight, y_true.shape[0])
    dtype = _checks.float_dtype(y_true, y_pred, *(() if weight is None else (weight,)))
    weight = jnp.ones(y_true.shape[:1], dtype) if weight is None else weight.astype(dtype)
    as_2d = lambda y: y.astype(dtype).reshape(y.shape[0], -1)  # noqa: E731
    return as_2d(y_true), as_2d(y_pred), weight


def _combine_outputs(per_output: jax.Array, multioutput) -> jax.Array:
    if isinstance(multioutput, str):
        if multioutput not in _MULTIOUTPUT:
            raise ValueError(
                f"multioutput={multioutput!r}; choose one of {_MULTIOUTPUT} or output weights"
            )
        if multioutput == "raw_values":
            return per_output
        weights = jnp.ones_like(per_output)
    else:
        weights = jnp.asarray(multioutput, per_output.dtype)
    if weights.shape != per_output.shape:
        raise ValueError(f"multioutput weights have shape {weights.shape}, need {per_output.shape}")
    # Normalised weights first: a sum of representable metrics may overflow, their mean not.
    return jnp.sum(per_output * (weights / jnp.sum(weights)))


def _abs_error(y_true, y_pred, kind):
    """Per-element error in *half* units (the error is ``2 * value``), so that an error
    beyond the dtype's range (``y_pred - y_true`` overflowing) stays finite."""
    diff = y_pred - y_true
    fits = jnp.isfinite(diff)
    half = jnp.where(fits, jnp.abs(diff) * 0.5, jnp.abs(y_pred * 0.5 - y_true * 0.5))
    if kind != "mape":
        return half
    # MAPE is a ratio: ``|diff| / den`` directly (no subnormal halving of tiny errors),
    # ``(|diff| / 2) / (den / 2)`` where the difference overflows (den >= float64 eps).
    den = jnp.maximum(jnp.abs(y_true), _MAPE_EPS)
    return jnp.where(fits, jnp.abs(diff) / den, half / (den * 0.5)) * 0.5


@functools.partial(jax.jit, static_argnames=("kind", "axis_name"))
def _per_output(y_true, y_pred, weight, *, kind, axis_name):
    """Weighted mean over samples of a per-element error, one value per output column,
    as ``(scaled, factor)``: the metric is ``scaled * factor``.

    Errors are rescaled by a power of two near their maximum before they are squared and
    summed, so the sums neither overflow nor lose tiny errors: the result is finite
    whenever the metric itself is representable.
    """
    half = _abs_error(y_true, y_pred, kind)
    top = jnp.max(half)
    if axis_name is not None:
        top = jax.lax.pmax(top, axis_name)
    down, up = pow2_scale(top)
    err = half * down
    if kind == "rmse":
        err = jnp.square(err)
    sums = (jnp.sum(err * weight[:, None], axis=0), jnp.sum(weight))
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    mean = sums[0] / sums[1]
    scaled = jnp.sqrt(mean) if kind == "rmse" else mean
    return scaled, up * 2  # the metric is scaled * factor


def _error_metric(kind, y_true, y_pred, sample_weight, multioutput, axis_name):
    y_true, y_pred, weight = _regression_inputs(y_true, y_pred, sample_weight)
    scaled, factor = _per_output(y_true, y_pred, weight, kind=kind, axis_name=axis_name)
    # Outputs are combined while still scaled: one output's metric may be beyond the range
    # while their average is not. (The product overflows only when the metric does.)
    return _combine_outputs(scaled, multioutput) * factor


def _documented(fn):
    fn.__doc__ = fn.__doc__.replace("{args}", _ARGS_DOC)
    return fn


@_documented
def mae(y_true: ArrayLike, y_pred: ArrayLike, *, sample_weight: ArrayLike | None = None,
        multioutput: str | ArrayLike = "uniform_average",
        axis_name: str | None = None) -> jax.Array:
    """Mean absolute error, like sklearn's ``mean_absolute_error``.

    {args}
    Examples:
      >>> from jaxopt_lab import metrics
      >>> float(metrics.mae([1.0, 2.0, 4.0], [1.5, 2.0, 3.0]))
      0.5
    """
    return _error_metric("mae", y_true, y_pred, sample_weight, multioutput, axis_name)


@_documented
def mape(y_true: ArrayLike, y_pred: ArrayLike, *, sample_weight: ArrayLike | None = None,
         multioutput: str | ArrayLike = "uniform_average",
         axis_name: str | None = None) -> jax.Array:
    """Mean absolute percentage error, like sklearn's ``mean_absolute_percentage_error``.

    A fraction, not a percentage: ``mean(|y_pred - y_true| / max(|y_true|, eps))`` with
    ``eps = np.finfo(np.float64).eps`` exactly as sklearn, so a zero target with a
    non-zero error gives a huge finite value (about ``4.5e15 * |error|``), not inf and not
    an exception; a zero target predicted exactly contributes 0.

    {args}
    Examples:
      >>> from jaxopt_lab import metrics
      >>> round(float(metrics.mape([1.0, 2.0, 4.0], [1.5, 2.0, 3.0])), 4)
      0.25
    """
    return _error_metric("mape", y_true, y_pred, sample_weight, multioutput, axis_name)


@_documented
def rmse(y_true: ArrayLike, y_pred: ArrayLike, *, sample_weight: ArrayLike | None = None,
         multioutput: str | ArrayLike = "uniform_average",
         axis_name: str | None = None) -> jax.Array:
    """Root mean squared error, like sklearn's ``root_mean_squared_error``.

    The square root is taken per output, then outputs are averaged (as sklearn does).

    {args}
    Examples:
      >>> from jaxopt_lab import metrics
      >>> round(float(metrics.rmse([1.0, 2.0, 4.0], [1.5, 2.0, 3.0])), 4)
      0.6455
    """
    return _error_metric("rmse", y_true, y_pred, sample_weight, multioutput, axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _pearson(x, y, *, axis_name):
    def total(v, op=jax.lax.psum):
        return v if axis_name is None else op(v, axis_name)

    def centred(v):
        # r is invariant to positive scaling: scale by a power of two near max|v| first so
        # that huge or tiny inputs neither overflow nor underflow (nor lose differences
        # smaller than the smallest normal number), then again after centring. (Not
        # v / max|v|: XLA multiplies by 1 / max|v|, flushed to 0 beyond 2**126.)
        count = total(jnp.asarray(v.shape[0], v.dtype))
        v = v * pow2_scale(total(jnp.max(jnp.abs(v)), jax.lax.pmax))[0]
        v = v - total(jnp.sum(v)) / count
        v = v * pow2_scale(total(jnp.max(jnp.abs(v)), jax.lax.pmax))[0]
        # A second pass removes the rounding error of the first mean: for nearly constant
        # input ([1, 1, 1 + 2**-23]) the rounded mean is one of the values, and the
        # differences that make up r would be lost without it.
        v = v - total(jnp.sum(v)) / count
        return v * pow2_scale(total(jnp.max(jnp.abs(v)), jax.lax.pmax))[0]

    def constant(v):
        return total(jnp.max(v), jax.lax.pmax) == total(jnp.min(v), jax.lax.pmin)

    xs, ys = centred(x), centred(y)
    r = total(jnp.sum(xs * ys)) / jnp.sqrt(total(jnp.sum(xs * xs)) * total(jnp.sum(ys * ys)))
    return jnp.where(constant(x) | constant(y), jnp.nan, jnp.clip(r, -1, 1))


def pearson(x: ArrayLike, y: ArrayLike, *, axis_name: str | None = None) -> jax.Array:
    """Pearson's correlation coefficient, like ``scipy.stats.pearsonr`` / ``np.corrcoef``.

    The coefficient is undefined when an input is constant. scipy returns NaN with a
    warning; this function raises a ``ValueError`` on concrete inputs and returns NaN
    under ``jit`` (never a finite number computed from rounding noise). XLA flushes
    subnormal numbers to 0, so an input whose values differ only by subnormal amounts
    (``[0, 1e-45]`` in float32) counts as constant too. Any other finite input, huge or
    tiny, gives a finite ``r``.

    Args:
      x: ``(N,)`` values, ``N >= 2``.
      y: ``(N,)`` values.
      axis_name: a ``pmap``/``shard_map`` axis over which the samples are split.

    Returns:
      A scalar in ``[-1, 1]`` (NaN under ``jit`` for a constant input).

    Raises:
      ValueError: for mismatched lengths, fewer than two samples, non-1-D inputs, NaN/Inf
        or a constant input (value checks only on concrete inputs).

    Examples:
      >>> from jaxopt_lab import metrics
      >>> float(metrics.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0]))  # doctest: +ELLIPSIS
      0.99...
    """
    x = _checks.as_array("x", x, (1,))
    y = _checks.as_array("y", y, (1,))
    n = _checks.same_length(x=x, y=y)
    if n < 2 and axis_name is None:
        raise ValueError(f"pearson needs at least 2 samples, got {n}")
    _checks.check_finite("x", x)
    _checks.check_finite("y", y)
    dtype = _checks.float_dtype(x, y)
    tiny = float(jnp.finfo(dtype).tiny)
    for name, v in (("x", x), ("y", y)):
        if _checks.is_traced(v) or axis_name is not None:
            continue
        # XLA flushes subnormal numbers to 0, so values differing only in subnormals are
        # constant to the computation: rejected like a truly constant input.
        a = np.asarray(v).astype(np.float64)
        if np.ptp(np.where(np.abs(a) < tiny, 0.0, a)) == 0:
            raise ValueError(f"{name} is constant ({a[0]}; subnormals count as 0); "
                             "Pearson's r is undefined")
    return _pearson(x.astype(dtype), y.astype(dtype), axis_name=axis_name)
