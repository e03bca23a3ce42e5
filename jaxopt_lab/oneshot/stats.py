"""Calibration statistics of one layer input: ``X^T X`` and per-channel magnitudes.

Every one-shot method reads the same small record, accumulated batch by batch over the
token rows ``X`` (shape ``(rows, K)``) that reach one kernel's contraction:

* ``xtx``: ``X^T X`` (the GPTQ/SparseGPT Hessian up to a factor 2), float32 ``(K, K)``;
* ``abs_sum``: ``sum_rows |X|`` per input channel (AWQ's activation magnitude);
* ``abs_max``: ``max_rows |X|`` per input channel (SmoothQuant's);
* ``count``: rows seen.

Wanda's input norm ``||X_k||_2`` is ``sqrt(diag(xtx))``. Accumulation is jitted; with
``axis_name`` set it reduces each batch's contribution across devices (``psum``/``pmax``),
so a calibration set split over devices gives the single-device statistics.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LayerStats(NamedTuple):
    """Input statistics of one kernel (see the module docstring)."""

    xtx: jax.Array
    abs_sum: jax.Array
    abs_max: jax.Array
    count: jax.Array


def check_size(fn: str, arg: str, k) -> int:
    """``k`` as an int if it is a positive integer (Python or NumPy, not bool), else a
    ``ValueError`` naming ``fn`` and the value: ``int(k)`` would turn 2.5 into 2 and "4"
    into 4 without a word."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{fn}: {arg} must be a positive int, got {k!r}")
    return int(k)


def hessian_init(k: int) -> LayerStats:
    """Empty statistics for an input of ``k`` channels.

    Examples:
      >>> s = hessian_init(3)
      >>> s.xtx.shape, int(s.count)
      ((3, 3), 0)
    """
    k = check_size("hessian_init", "k", k)
    return LayerStats(jnp.zeros((k, k), jnp.float32), jnp.zeros((k,), jnp.float32),
                      jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("axis_name",))
def hessian_accumulate(stats: LayerStats, x: jax.typing.ArrayLike, *,
                       mask: jax.typing.ArrayLike | None = None,
                       axis_name: str | None = None) -> LayerStats:
    """Adds the rows of ``x`` (shape ``(..., K)``: every leading axis is a token axis).

    Args:
      stats: the running statistics (`hessian_init`).
      x: layer inputs; cast to float32.
      mask: optional, shape ``x.shape[:-1]``: only rows where it is nonzero count (padding
        tokens left out without a host round trip, and with one static shape per batch).
      axis_name: a mapped axis (``pmap``/``shard_map``) to reduce this batch over.

    Returns:
      The updated statistics.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = hessian_accumulate(hessian_init(2), jnp.array([[1.0, 2.0], [3.0, 0.0]]))
      >>> s.xtx.tolist(), s.abs_max.tolist(), int(s.count)
      ([[10.0, 2.0], [2.0, 4.0]], [3.0, 2.0], 2)
    """
    x = jnp.asarray(x, jnp.float32)
    k = stats.xtx.shape[0]
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"hessian_accumulate: inputs of shape {x.shape} do not end in K={k}")
    rows = x.reshape(-1, k)
    if mask is None:
        count = jnp.int32(rows.shape[0])
    else:
        if np.shape(mask) != x.shape[:-1]:
            raise ValueError(f"hessian_accumulate: mask of shape {np.shape(mask)} does not "
                             f"match the inputs' rows {x.shape[:-1]}")
        keep = jnp.asarray(mask).reshape(-1) != 0
        # where, not a product: a padded row holding Inf/NaN must not leak in.
        rows = jnp.where(keep[:, None], rows, 0.0)
        count = keep.sum(dtype=jnp.int32)
    xtx = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
    a = jnp.abs(rows)
    abs_sum, abs_max = a.sum(0), a.max(0, initial=0.0)
    if axis_name is not None:
        xtx, abs_sum, count = jax.lax.psum((xtx, abs_sum, count), axis_name)
        abs_max = jax.lax.pmax(abs_max, axis_name)
    return LayerStats(stats.xtx + xtx, stats.abs_sum + abs_sum,
                      jnp.maximum(stats.abs_max, abs_max), stats.count + count)


def check_stats(name: str, stats: LayerStats, k: int) -> None:
    """Raises ``ValueError`` naming ``name`` for missing, mis-shaped or non-finite stats."""
    if stats is None:
        raise ValueError(f"{name}: no calibration statistics for this layer")
    if np.shape(stats.xtx) != (k, k):
        raise ValueError(f"{name}: statistics of shape {np.shape(stats.xtx)} do not match "
                         f"the kernel's contraction size K={k}")
    if int(stats.count) <= 0:
        raise ValueError(f"{name}: no calibration data (0 rows seen)")
    if not bool(jnp.isfinite(stats.xtx).all()):
        raise ValueError(f"{name}: the Hessian X^T X holds NaN or Inf")
