"""Calibration statistics of every kernel, captured through the model's own ops.

`calibration_stats` runs a linen or NNX model on calibration batches through the hook
layer (`jaxopt_lab.core.capture.layer_inputs`) and accumulates, per kernel, the
`LayerStats` GPTQ, SparseGPT, Wanda and AWQ read: ``X^T X`` over the rows of the input as
the kernel's contraction sees it (a conv's patches, an attention kernel's ``embed`` axis),
the per-column absolute sums and maxima, and the row count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
from flax.errors import FlaxError

from jaxopt_lab.core.capture import layer_inputs
from jaxopt_lab.core.mapping import Names
from jaxopt_lab.oneshot.stats import LayerStats, hessian_accumulate, hessian_init


def calibration_stats(
    model: Any,
    variables: Any,
    batches: Iterable[Any],
    *,
    where: Callable[[Names], bool] | None = None,
    axis_name: str | None = None,
    **kwargs: Any,
) -> dict[Names, LayerStats]:
    """``{kernel names: LayerStats}`` over ``batches`` (one jitted pass per batch).

    Args:
      model: a linen module or an NNX module/graphdef.
      variables: its variables (linen) or state (NNX; ``None`` for the module's own).
      batches: model inputs: an array, or a tuple of positional arguments, per batch.
      where: ``names -> bool`` choosing the kernels (default: every kernel contraction).
      axis_name: mapped axis to reduce each batch's statistics over (``pmap``).
      **kwargs: static keyword arguments of the model call.

    Returns:
      Statistics keyed by the kernel's names from the root of ``variables``; pass them
      to `gptq`, `sparsegpt`, `wanda` with the same tree or any subtree of it.

    Raises:
      ValueError: when ``batches`` is empty, or naming the batch's index and shapes (and
        the layer, when the model's error names it) for a batch the model cannot take.
    """
    @jax.jit
    def step(stats, args):
        _, xs = layer_inputs(model, variables, *args, where=where, **kwargs)
        if stats is None:
            stats = {k: hessian_init(x.shape[-1]) for k, x in xs.items()}
        return {k: hessian_accumulate(stats[k], xs[k], axis_name=axis_name) for k in xs}

    stats = None
    for i, batch in enumerate(batches):
        args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        try:
            if stats is None:
                stats = jax.eval_shape(lambda a: step(None, a), args)
                stats = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), stats)
            stats = step(stats, args)
        except (FlaxError, TypeError, ValueError) as err:
            # Flax's ScopeParamShapeError (or a matmul's TypeError) names a parameter but
            # not the batch; the original message, kept here, names the layer when known.
            shapes = [getattr(a, "shape", type(a).__name__) for a in args]
            raise ValueError(f"calibration_stats: the model cannot take batch {i} (input "
                             f"shapes {shapes}): {err}") from err
    if stats is None:
        raise ValueError("calibration_stats needs at least one batch")
    return stats
