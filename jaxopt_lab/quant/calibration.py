"""Activation calibration: per-tensor ranges for static int8 activation scales.

A `CalibrationState` accumulates, over a few batches, everything the four classic
range estimators need, so one pass over the data serves them all:

* ``"minmax"``: the running minimum and maximum over every batch seen;
* ``"ema"``: an exponential moving average of the per-batch minimum and maximum;
* ``"percentile"``: the ``percentile`` and ``100 - percentile`` quantiles, read off a histogram;
* ``"mse"``: the clipping range that minimises the expected squared quantization error
  (rounding noise ``s**2 / 12`` inside the range, squared distance to the range outside),
  searched over shrunk copies of the min/max range on the same histogram.

The histogram covers ``[-2**e, 2**e)`` with ``num_bins`` equal bins; when a batch exceeds
the range, ``e`` grows and old bins merge *exactly* into the wider ones (both are powers of
two), so no count is ever approximated.

With ``axis_name`` set (inside ``pmap`` or ``shard_map``), `observe` combines statistics over
that axis (``pmin``/``pmax`` of the ranges, ``psum`` of the counts): every replica holds the
same state, equal to observing the concatenated global batch on one device.

Examples:
  >>> import jax.numpy as jnp, jaxopt_lab as jol
  >>> state = jol.calibration_init()
  >>> for batch in (jnp.array([0.0, 1.0, 2.0]), jnp.array([-1.0, 4.0])):
  ...     state = jol.calibration_observe(state, batch)
  >>> [float(v) for v in jol.calibration_range(state, method="minmax")]
  [-1.0, 4.0]
  >>> scale, zero_point = jol.calibration_scale(state, method="minmax")
  >>> bool(scale == jnp.float32(4.0) / 127), zero_point is None
  (True, True)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.quant.affine import affine_params, integer_range

METHODS = ("minmax", "ema", "percentile", "mse")
_MIN_EXP = -126  # 2**-126: the smallest normal float32, the range before any data is seen
_MAX_SHIFT = 30  # merging by more than this many doublings puts everything in 2 centre bins


class CalibrationState(NamedTuple):
    """Running statistics of one activation tensor.

    Attributes:
      count: number of batches observed (int32 scalar).
      min: smallest value seen (float32 scalar; ``+inf`` before the first batch).
      max: largest value seen (``-inf`` before the first batch).
      ema_min: moving average of the per-batch minima (float32 scalar).
      ema_max: moving average of the per-batch maxima.
      histogram: int32 ``(num_bins,)`` counts over ``[-2**exponent, 2**exponent)``.
      exponent: int32 scalar, the histogram's half range as a power of two.
    """

    count: jax.Array
    min: jax.Array
    max: jax.Array
    ema_min: jax.Array
    ema_max: jax.Array
    histogram: jax.Array
    exponent: jax.Array


def calibration_init(*, num_bins: int = 2048) -> CalibrationState:
    """Empty statistics with a ``num_bins``-bin histogram (a power of two >= 2)."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) \
            or num_bins < 2 or num_bins & (num_bins - 1):
        raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins!r}")
    f32 = jnp.float32
    return CalibrationState(
        count=jnp.zeros((), jnp.int32),
        min=jnp.full((), jnp.inf, f32),
        max=jnp.full((), -jnp.inf, f32),
        ema_min=jnp.zeros((), f32),
        ema_max=jnp.zeros((), f32),
        histogram=jnp.zeros((int(num_bins),), jnp.int32),
        exponent=jnp.full((), _MIN_EXP, jnp.int32),
    )


def _check_batch(x: jax.typing.ArrayLike, name: str) -> jax.Array:
    if not hasattr(x, "dtype") or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise TypeError(f"{name}: calibration needs a floating-point array, got "
                        f"{type(x).__name__} with dtype {getattr(x, 'dtype', None)}")
    x = jnp.asarray(x)
    if x.size == 0:
        raise ValueError(f"{name}: cannot calibrate on an empty array of shape {x.shape}")
    # NumPy on the host: a closed-over constant inside a trace stays concrete this way.
    if not isinstance(x, jax.core.Tracer) and not np.isfinite(np.asarray(x)).all():
        raise ValueError(f"{name}: activations contain NaN or Inf")
    return x.astype(jnp.float32)


def _merge_bins(histogram: jax.Array, shift: jax.Array) -> jax.Array:
    """Re-bins a histogram over ``[-r, r)`` onto ``[-r * 2**shift, r * 2**shift)``, exactly.

    With ``n`` bins, old bin ``i`` lies inside new bin ``n/2 + floor((i - n/2) / 2**shift)``:
    both grids are integer multiples of the old width measured from the new lower edge.
    """
    n = histogram.shape[0]
    offsets = jnp.arange(n, dtype=jnp.int32) - n // 2
    target = n // 2 + jnp.right_shift(offsets, jnp.minimum(shift, _MAX_SHIFT))  # floor division
    return jnp.zeros_like(histogram).at[target].add(histogram)


def _bin_index(x: jax.Array, exponent: jax.Array, n: int) -> jax.Array:
    # floor(x * n / (2 * 2**exponent)) + n/2: a power-of-two scaling is exact, so binning on
    # a wide range equals binning on a narrow one and merging (`_merge_bins`), bit for bit.
    scaled = jnp.ldexp(x, (n // 2).bit_length() - 1 - exponent)
    # Underflow can round a tiny negative value to -0.0, whose floor would be 0, not -1.
    idx = jnp.where((x < 0) & (scaled > -1.0), -1.0, jnp.floor(scaled)) + n // 2
    return jnp.clip(jnp.nan_to_num(idx), 0, n - 1).astype(jnp.int32)


def calibration_observe(
    state: CalibrationState,
    x: jax.typing.ArrayLike,
    *,
    momentum: float = 0.9,
    axis_name: str | None = None,
    name: str = "activation",
) -> CalibrationState:
    """Adds one batch of activations to the statistics.

    Args:
      state: from `calibration_init` or a previous call.
      x: the activations (any shape, floating point).
      momentum: weight of the past in the moving averages; the first batch sets them.
      axis_name: a mapped axis (``pmap``/``shard_map``) over which to combine the batch
        statistics, so all replicas end with identical states.
      name: how error messages refer to ``x`` (e.g. the layer path).

    Returns:
      The updated state.

    Raises:
      TypeError: ``x`` is not a floating-point array.
      ValueError: ``x`` is empty, or concrete and holds NaN/Inf (traced NaN propagates into
        ``min``/``max`` and from there into every scale, never hidden).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    x = _check_batch(x, name)
    lo, hi = jnp.min(x), jnp.max(x)
    if axis_name is not None:
        lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    n = state.histogram.shape[0]
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    # frexp: amax = m * 2**e with m in [0.5, 1), so 2**e > amax; 0 and NaN give e = 0.
    _, batch_exp = jnp.frexp(jnp.nan_to_num(amax))
    exponent = jnp.maximum(state.exponent, batch_exp.astype(jnp.int32))
    histogram = _merge_bins(state.histogram, exponent - state.exponent)
    counts = jnp.zeros((n,), jnp.int32).at[_bin_index(x.ravel(), exponent, n)].add(1)
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
    first = state.count == 0
    ema = lambda old, new: jnp.where(first, new, momentum * old + (1.0 - momentum) * new)
    return CalibrationState(
        count=state.count + 1,
        min=jnp.minimum(state.min, lo),
        max=jnp.maximum(state.max, hi),
        ema_min=ema(state.ema_min, lo),
        ema_max=ema(state.ema_max, hi),
        histogram=histogram + counts,
        exponent=exponent,
    )


def _bin_edges(state: CalibrationState) -> tuple[jax.Array, jax.Array]:
    # Edges are integer multiples of the bin width 2**exponent / (n/2); built by ldexp, so an
    # edge beyond float32 (half range 2**128) is +-inf, never NaN, and the callers clamp to
    # the observed min/max.
    n = state.histogram.shape[0]
    k = jnp.arange(n, dtype=jnp.float32) - n // 2
    shift = state.exponent - ((n // 2).bit_length() - 1)
    return jnp.ldexp(k, shift), jnp.ldexp(k + 1.0, shift)


def _percentile_range(state: CalibrationState, percentile: float) -> tuple[jax.Array, jax.Array]:
    lower, upper = _bin_edges(state)
    counts = state.histogram.astype(jnp.float32)
    cdf = jnp.cumsum(counts)
    total = cdf[-1]
    tail = total * (1.0 - percentile / 100.0)
    # hi: upper edge of the first bin where the cdf reaches total - tail; lo mirrored.
    hi = upper[jnp.argmax(cdf >= total - tail)]
    lo = lower[jnp.argmax(cdf > tail)]
    return jnp.maximum(lo, state.min), jnp.minimum(hi, state.max)


def _mse_range(state: CalibrationState, *, bits: int, symmetric: bool,
               num_candidates: int) -> tuple[jax.Array, jax.Array]:
    # The error is computed in units of the histogram's half range 2**exponent (a power of
    # two: exact), so squares of huge activations cannot overflow float32.
    n = state.histogram.shape[0]
    centres = ((jnp.arange(n, dtype=jnp.float32) - n // 2 + 0.5) / (n // 2))[None, :]
    counts = state.histogram.astype(jnp.float32)[None, :]
    lo0, hi0 = jnp.minimum(state.min, 0.0), jnp.maximum(state.max, 0.0)
    if symmetric:
        amax = jnp.maximum(-lo0, hi0)
        lo0, hi0 = -amax, amax
    qmin, qmax = integer_range(bits, symmetric)
    alphas = jnp.arange(1, num_candidates + 1, dtype=jnp.float32)[:, None] / num_candidates
    lo = alphas * jnp.ldexp(lo0, -state.exponent)  # (candidates, 1), normalised
    hi = alphas * jnp.ldexp(hi0, -state.exponent)
    step = (hi - lo) / (qmax - qmin)
    clipped = jnp.square(jnp.maximum(lo - centres, 0.0) + jnp.maximum(centres - hi, 0.0))
    inside = jnp.square(step) / 12.0
    err = jnp.sum(counts * jnp.where((centres < lo) | (centres > hi), clipped, inside), axis=1)
    best = jnp.argmin(err)
    return alphas[best, 0] * lo0, alphas[best, 0] * hi0


def calibration_range(
    state: CalibrationState,
    *,
    method: str = "minmax",
    percentile: float = 99.99,
    bits: int = 8,
    symmetric: bool = True,
    num_candidates: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """The calibrated range ``(lo, hi)`` of the observed activations.

    Args:
      state: statistics from `calibration_observe` (at least one batch).
      method: ``"minmax"``, ``"ema"``, ``"percentile"`` or ``"mse"`` (see the module doc).
      percentile: for ``"percentile"``, in ``(50, 100]``; both tails are clipped.
      bits, symmetric: the target code format, for ``"mse"``.
      num_candidates: clipping ranges tried by ``"mse"`` (``k / num_candidates`` of min/max).

    Returns:
      Two float32 scalars; NaN if NaN was observed under tracing.

    Raises:
      ValueError: for an unknown method or a percentile outside ``(50, 100]``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if state.histogram.ndim > 1:  # stacked states (e.g. pmap outputs): one range each
        return jax.vmap(lambda s: calibration_range(
            s, method=method, percentile=percentile, bits=bits, symmetric=symmetric,
            num_candidates=num_candidates))(state)
    if not isinstance(state.count, jax.core.Tracer) and int(np.max(state.count)) == 0:
        raise ValueError("calibration_range: no batches observed yet (count == 0)")
    if method == "minmax":
        lo, hi = state.min, state.max
    elif method == "ema":
        lo, hi = state.ema_min, state.ema_max
    elif method == "percentile":
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        lo, hi = _percentile_range(state, percentile)
    else:
        lo, hi = _mse_range(state, bits=bits, symmetric=symmetric,
                            num_candidates=num_candidates)
    # The histogram cannot see NaN: carry it over from the exact extremes.
    poison = jnp.where(jnp.isnan(state.min) | jnp.isnan(state.max), jnp.nan, 0.0)
    return lo + poison, hi + poison


def calibration_scale(
    state: CalibrationState,
    *,
    method: str = "minmax",
    bits: int = 8,
    symmetric: bool = True,
    percentile: float = 99.99,
    num_candidates: int = 128,
) -> tuple[jax.Array, jax.Array | None]:
    """Scale and zero point (``None`` when symmetric) for the calibrated range.

    The range always includes 0 (so zero is exactly representable); an all-zero
    activation gets scale 1, never 0 or NaN. See `calibration_range` for the arguments.
    """
    lo, hi = calibration_range(state, method=method, percentile=percentile, bits=bits,
                               symmetric=symmetric, num_candidates=num_candidates)
    return affine_params(lo, hi, bits=bits, symmetric=symmetric)
