"""Finding the linen layers whose output goes straight into a BatchNorm, by tracing once.

The model is traced with ``jax.make_jaxpr`` under ``flax.linen.intercept_methods``. Every
Conv/ConvTranspose/Dense/DenseGeneral output is tagged and remembered; a BatchNorm whose
input *is* one of those objects (tensor identity) is a candidate. ``plan.py`` then checks
in the jaxpr that the BatchNorm is the layer output's only consumer and plans the fold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxopt_lab.fold.plan import (
    BNCall,
    LayerCall,
    Path,
    StoredShape,
    consumers,
    new_tag,
    plan_calls,
    shape_of,
)

LAYER_TYPES = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral)


def _canonical_axes(axis, ndim: int) -> tuple[int, ...]:
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def _layer_feature_count(module: nn.Module) -> int:
    if isinstance(module, nn.DenseGeneral):
        return len(module.features) if isinstance(module.features, (tuple, list)) else 1
    return 1


def _record_layer(module, y, calls: list) -> Any:
    if not isinstance(y, jax.Array) or getattr(y, "ndim", 0) == 0:
        return y
    tag = new_tag()
    y = checkpoint_name(y, tag)
    k = _layer_feature_count(module)
    calls.append(LayerCall(
        path=tuple(module.scope.path), out=y, tag=tag,
        feature_axes=tuple(range(y.ndim - k, y.ndim)),
        kernel_shape=shape_of(module.get_variable("params", "kernel")),
        bias_shape=shape_of(module.get_variable("params", "bias")),
        kernel_features_last=not (isinstance(module, nn.ConvTranspose)
                                  and module.transpose_kernel),
    ))
    return y


def _record_bn(module, args, kwargs, layers: list, bns: list):
    args = list(args)
    x = args[0] if args else kwargs["x"]
    call_flag = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    eval_mode = bool(module.use_running_average if call_flag is None else call_flag)
    layer = next((c for c in reversed(layers) if c.out is x), None)
    tag = None
    if layer is not None:
        tag = new_tag()
        x = checkpoint_name(x, tag)
        if args:
            args[0] = x
        else:
            kwargs = {**kwargs, "x": x}
    var = module.get_variable("batch_stats", "var")
    if var is None:  # variables without batch_stats (e.g. only params): say so, don't crash
        raise ValueError(f"BatchNorm {'/'.join(module.scope.path)} has no batch_stats['var'] "
                         "in the variables; pass the full variables, not only 'params'")
    stat_dtype = np.dtype(var.dtype if module.force_float32_reductions else module.param_dtype)
    axes = _canonical_axes(module.axis, x.ndim)
    bns.append(BNCall(
        path=tuple(module.scope.path), layer=layer, tag=tag, eval_mode=eval_mode, axes=axes,
        in_shape=tuple(x.shape), epsilon=float(module.epsilon), stat_dtype=stat_dtype,
        stat_shape=tuple(x.shape[a] for a in axes),
        use_scale=module.use_scale, use_bias=module.use_bias,
    ))
    return args, kwargs


def _trace(model: nn.Module, variables, args, kwargs):
    layers: list[LayerCall] = []
    bns: list[BNCall] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
        if isinstance(module, nn.BatchNorm):
            call_args, call_kwargs = _record_bn(module, call_args, call_kwargs, layers, bns)
            return next_fun(*call_args, **call_kwargs)
        if isinstance(module, LAYER_TYPES):
            return _record_layer(module, next_fun(*call_args, **call_kwargs), layers)
        return next_fun(*call_args, **call_kwargs)

    kwargs = {k: v for k, v in kwargs.items() if k != "mutable"}

    def run(v):
        with nn.intercept_methods(interceptor):
            return model.apply(v, *args, mutable=True, **kwargs)

    closed = jax.make_jaxpr(run)(variables)
    return layers, bns, consumers(closed)


def linen_stored_shape(variables: Mapping) -> StoredShape:
    """Looks up ``variables[collection][*path][name]``'s shape (None when absent)."""
    def stored_shape(collection: str, path: Path, name: str):
        node = variables.get(collection, {})
        for key in path:
            node = node.get(key, {}) if isinstance(node, Mapping) else {}
        return shape_of(node.get(name)) if isinstance(node, Mapping) else None
    return stored_shape


def plan_linen(model: nn.Module, variables: Mapping, *args, **kwargs):
    """Traces ``model.apply(variables, *args, **kwargs)`` once and plans the fold.

    Returns:
      ``(pairs, skipped)``: a list of ``PairPlan`` and a list of ``SkippedBatchNorm``.
    """
    layers, bns, uses = _trace(model, variables, args, kwargs)
    return plan_calls(layers, bns, uses, linen_stored_shape(variables))
