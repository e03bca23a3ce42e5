"""Calibrating static int8 activation scales for every layer of a linen or NNX model.

A calibration pass runs the float model on a few batches through the hook layer
(`jaxopt_lab.core.flax_hooks`), which feeds the input of every kernel contraction -- a
``dot_general`` (Dense, DenseGeneral, attention, Einsum, ``Embed.attend``) or a convolution
-- to a `CalibrationState`, keyed by the kernel's layer (``"Dense_0"``, ``"Block_0/Conv_1"``,
``"MultiHeadDotProductAttention_0/query"``), exactly the ops `quantized_apply` intercepts.
The states turn into per-tensor scales with `activation_scales`; `calibrate` does both.
The pass is a pure function of (variables, statistics, inputs), so it can be jitted,
and with ``axis_name`` it runs under ``pmap`` with the statistics combined over devices.

Examples:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_lab as jol
  >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  >>> x = jnp.linspace(-1.0, 1.0, 24).reshape(6, 4)
  >>> variables = model.init(jax.random.PRNGKey(0), x)
  >>> scales = jol.calibrate(model, variables, [(x[:3],), (x[3:],)], method="minmax")
  >>> sorted(scales)
  ['layers_0', 'layers_2']
  >>> qvars = jol.quantize(variables, bits=8)
  >>> y = jol.quantized_apply(model, qvars, x, mode="w8a8", act_scales=scales)
  >>> bool(jnp.allclose(y, model.apply(variables, x), atol=0.05))
  True
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxopt_lab.core import flax_hooks
from jaxopt_lab.core.mapping import layer_of, path_names

from jaxopt_lab.quant.calibration import (
    CalibrationState,
    calibration_init,
    calibration_observe,
    calibration_scale,
)
from jaxopt_lab.quant.interceptor import ActScales
from jaxopt_lab.quant.qtensor import is_qtensor

Variables = Any
Stats = dict[str, CalibrationState]


def observe_activations(
    model: Any,
    variables: Variables,
    stats: Mapping[str, CalibrationState] | None,
    *args: Any,
    momentum: float = 0.9,
    axis_name: str | None = None,
    num_bins: int = 2048,
    **kwargs: Any,
) -> Stats:
    """Runs ``model.apply(variables, *args, **kwargs)`` and records every layer's input.

    Args:
      model: a Flax linen module or an NNX module (unchanged).
      variables: float variables, or quantized ones (then dequantized first).
      stats: statistics from a previous call, or ``None`` to start.
      *args, **kwargs: the model's inputs (``train=False`` and so on), as for ``apply``.
      momentum: of the moving-average ranges.
      axis_name: mapped axis over which statistics are combined (``pmap``/``shard_map``).
      num_bins: histogram bins for layers seen for the first time.

    Returns:
      ``{layer key: CalibrationState}`` covering every kernel contraction the forward pass
      ran (a layer called twice is observed twice).
    """
    if stats is not None and not isinstance(stats, Mapping):
        # The usual slip: the model's input passed where the statistics go.
        raise TypeError(
            f"stats must be None or the mapping a previous observe_activations call returned, "
            f"got {type(stats).__name__}{getattr(stats, 'shape', '')}; the model's inputs come "
            f"after it: observe_activations(model, variables, None, x)")
    new: Stats = dict(stats or {})
    program = flax_hooks.trace(model, variables, *args, **kwargs)
    layers = [layer_of(path_names(p), program.api) for p in program.paths]

    def record(eqn, uses, views, read, leaves):
        del leaves
        for use, view in zip(uses, [v for v in views if v is not None]):
            if use.op not in ("dot_general", "conv"):
                continue
            x = read(eqn.invars[1 - use.operand])
            key = layers[view.leaf]
            state = new.get(key)
            if state is None:
                state = calibration_init(num_bins=num_bins)
            new[key] = calibration_observe(state, x, momentum=momentum, axis_name=axis_name,
                                           name=key)
        return None

    flax_hooks.run(program, program.leaves, jax.tree.leaves(args),
                   hook=record, float_leaf=lambda x: x.dequantize() if is_qtensor(x) else x)
    return new


@functools.partial(jax.jit, static_argnames=("method", "symmetric", "percentile",
                                             "num_candidates"))
def _scale(state, *, method, symmetric, percentile, num_candidates):
    return calibration_scale(state, method=method, bits=8, symmetric=symmetric,
                             percentile=percentile, num_candidates=num_candidates)


def activation_stats_init(
    model: Any, variables: Variables, *args: Any, num_bins: int = 2048, **kwargs: Any
) -> Stats:
    """Empty statistics for every layer the forward pass on ``args`` would observe.

    Traces the model abstractly (nothing is computed), so a jitted calibration loop starting
    from these states keeps one pytree structure and compiles once.
    """
    keys = jax.eval_shape(lambda v: observe_activations(model, v, None, *args, **kwargs),
                          variables)
    return {key: calibration_init(num_bins=num_bins) for key in keys}


def activation_scales(
    stats: Mapping[str, CalibrationState],
    *,
    method: str = "percentile",
    symmetric: bool = True,
    percentile: float = 99.99,
    num_candidates: int = 128,
) -> ActScales:
    """Static per-tensor int8 scales ``{layer key: (scale, zero point or None)}``.

    See `calibration_range` for the methods; ``symmetric=False`` gives zero points, which
    double the resolution for non-negative inputs (after a ReLU) at the cost of a
    correction term in the int8 layers.
    """
    out = {}
    for key, state in stats.items():
        if not isinstance(state.count, jax.core.Tracer) and int(np.min(state.count)) == 0:
            raise ValueError(f"layer {key!r}: no batches observed yet")
        extremes = np.asarray([state.min, state.max]) if not isinstance(
            state.min, jax.core.Tracer) else None
        if extremes is not None and not np.isfinite(extremes).all():
            raise ValueError(f"layer {key!r}: observed activations hold NaN or Inf (a jitted "
                             "pass cannot check them; did an earlier layer overflow?)")
        out[key] = _scale(state, method=method, symmetric=symmetric,
                          percentile=float(percentile), num_candidates=int(num_candidates))
    return out


def _observe_step(model: Any, momentum: float, num_bins: int, kwargs: dict) -> Any:
    """The jitted `observe_activations` step of a calibration loop, shared by every call
    with the same linen model and settings, so a second `calibrate` does not compile again.

    Only linen modules are cached: they are immutable and hashed by their fields. An NNX
    module holds mutable state, so it gets a fresh step per call.
    """
    if not flax_hooks.is_nnx(model):
        try:
            return _cached_observe_step(model, momentum, num_bins, tuple(sorted(kwargs.items())))
        except TypeError:  # an unhashable keyword value: no cache for this call
            pass
    return _new_observe_step(model, momentum, num_bins, tuple(kwargs.items()))


def _new_observe_step(model: Any, momentum: float, num_bins: int, kwargs: tuple) -> Any:
    @jax.jit
    def step(variables, stats, batch_args):
        return observe_activations(model, variables, stats, *batch_args, momentum=momentum,
                                   num_bins=num_bins, **dict(kwargs))

    return step


_cached_observe_step = functools.lru_cache(maxsize=16)(_new_observe_step)


def calibrate(
    model: Any,
    variables: Variables,
    batches: Iterable[Any],
    *,
    method: str = "percentile",
    symmetric: bool = True,
    percentile: float = 99.99,
    momentum: float = 0.9,
    num_bins: int = 2048,
    **kwargs: Any,
) -> ActScales:
    """Static activation scales for `quantized_apply(mode="w8a8")` from a few batches.

    Args:
      model, variables: the model and its float (or quantized) variables.
      batches: an iterable of model inputs: an array, or a tuple of positional arguments.
      method, symmetric, percentile: see `activation_scales`.
      momentum, num_bins: see `observe_activations`.
      **kwargs: keyword arguments of ``model.apply`` (e.g. ``train=False``).

    Returns:
      ``{layer key: (scale, zero point or None)}``.

    Raises:
      ValueError: if ``batches`` is empty.
    """
    step = _observe_step(model, momentum, num_bins, kwargs)
    stats = None
    for batch in batches:
        batch_args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if stats is None:  # the full structure up front, so the loop compiles once
            stats = activation_stats_init(model, variables, *batch_args, num_bins=num_bins,
                                          **kwargs)
        stats = step(variables, stats, batch_args)
    if stats is None:
        raise ValueError("calibrate needs at least one batch")
    return activation_scales(stats, method=method, symmetric=symmetric, percentile=percentile)
