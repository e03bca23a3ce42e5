"""Finding the linear layers whose output goes straight into a BatchNorm, by tracing once.

The model is traced with ``jax.make_jaxpr`` under ``flax.linen.intercept_methods``. Every
Conv/ConvTranspose/Dense/DenseGeneral output is tagged with ``checkpoint_name`` (an identity
that shows up in the jaxpr) and remembered; a BatchNorm whose input *is* one of those
objects (tensor identity) is a candidate, and its input gets a tag too. The jaxpr then
proves the pair is exclusive: the layer's output has exactly one consumer, the BatchNorm,
so folding cannot change anything else (a residual that also reads the conv output, say).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.extend.core as jex
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxopt_lab.fold.report import SkippedBatchNorm

Path = tuple[str, ...]
LAYER_TYPES = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral)
_TAGS = itertools.count()
TAG_PREFIX = "jaxopt_lab_fold_"


class PairPlan(NamedTuple):
    """A foldable pair and the static facts the arithmetic needs."""

    layer: Path
    batch_norm: Path
    epsilon: float
    stat_dtype: np.dtype
    kernel_shape: tuple[int, ...]  # as stored
    bias_shape: tuple[int, ...] | None  # None: the layer has no bias
    stat_shape: tuple[int, ...]  # BatchNorm mean/var/scale/bias shape
    kernel_bcast: tuple[int, ...]  # reshape of a stat to broadcast against the kernel
    bias_bcast: tuple[int, ...]  # ... and against the bias
    use_scale: bool
    use_bias: bool


class LayerCall(NamedTuple):
    path: Path
    out: Any
    tag: str
    feature_axes: tuple[int, ...]  # output axes holding the layer's features
    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    kernel_features_last: bool  # False for ConvTranspose(transpose_kernel=True)


class BNCall(NamedTuple):
    path: Path
    layer: LayerCall | None
    tag: str | None
    eval_mode: bool
    axes: tuple[int, ...]
    in_shape: tuple[int, ...]
    epsilon: float
    stat_dtype: np.dtype
    stat_shape: tuple[int, ...]
    use_scale: bool
    use_bias: bool


def new_tag() -> str:
    """A fresh name for ``checkpoint_name``, unique within the process."""
    return f"{TAG_PREFIX}{next(_TAGS)}"


def path_name(path: Path) -> str:
    """``("block1", "Conv_0")`` -> ``"block1/Conv_0"``."""
    return "/".join(path)


def _shape(x) -> tuple[int, ...] | None:
    return None if x is None else tuple(np.shape(x))


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
        kernel_shape=_shape(module.get_variable("params", "kernel")),
        bias_shape=_shape(module.get_variable("params", "bias")),
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
    stat_dtype = np.dtype(var.dtype if module.force_float32_reductions else module.param_dtype)
    axes = _canonical_axes(module.axis, x.ndim)
    bns.append(BNCall(
        path=tuple(module.scope.path), layer=layer, tag=tag, eval_mode=eval_mode, axes=axes,
        in_shape=tuple(x.shape), epsilon=float(module.epsilon), stat_dtype=stat_dtype,
        stat_shape=tuple(x.shape[a] for a in axes),
        use_scale=module.use_scale, use_bias=module.use_bias,
    ))
    return args, kwargs


def consumers(closed: jex.ClosedJaxpr) -> dict[str, tuple[Any, list]]:
    """``tag -> (jaxpr outvar, [consumer name-tags or '?'])`` for every tagged value."""
    found: dict[str, tuple[Any, list]] = {}

    def visit(jaxpr: jex.Jaxpr) -> None:
        produced = {}
        for eqn in jaxpr.eqns:
            name = eqn.params.get("name") if eqn.primitive.name == "name" else None
            if isinstance(name, str) and name.startswith(TAG_PREFIX):
                produced[id(eqn.outvars[0])] = name
                found[name] = (eqn.outvars[0], [])
            for sub in jex.jaxprs_in_params(eqn.params):
                visit(sub)
        for eqn in jaxpr.eqns:
            consumer = eqn.params.get("name", "?") if eqn.primitive.name == "name" else "?"
            for v in eqn.invars:
                if id(v) in produced:
                    found[produced[id(v)]][1].append(consumer)
        for v in jaxpr.outvars:
            if id(v) in produced:
                found[produced[id(v)]][1].append("<output>")

    visit(closed.jaxpr)
    return found


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


def problem(bn: BNCall, uses: dict) -> str | None:
    """Why this single BatchNorm call cannot be folded into its input layer, or None."""
    layer = bn.layer
    if layer is None:
        return "its input is not the direct output of a Conv/ConvTranspose/Dense/DenseGeneral"
    if not bn.eval_mode:
        return ("it runs in training mode (batch statistics) in this trace; pass the eval "
                "arguments, e.g. train=False")
    if not set(bn.axes) <= set(layer.feature_axes):
        return (f"its feature axes {bn.axes} are not among the output feature axes "
                f"{layer.feature_axes} of {path_name(layer.path)}")
    if layer.kernel_shape is None:
        return f"{path_name(layer.path)} has no 'kernel' in the 'params' collection"
    consumers = uses.get(layer.tag, (None, None))[1]
    if consumers != [bn.tag]:
        return (f"the output of {path_name(layer.path)} is also used elsewhere, so folding "
                "would change that use")
    return None


def _bcast(bn: BNCall, layer: LayerCall) -> tuple[tuple[int, ...], tuple[int, ...]]:
    feat = tuple(bn.in_shape[a] if a in bn.axes else 1 for a in layer.feature_axes)
    return (feat if layer.kernel_features_last else feat + (1,)), feat


StoredShape = Callable[[str, Path, str], "tuple[int, ...] | None"]


def _check_stored(plan: PairPlan, stored_shape: StoredShape) -> str | None:
    """Stored shapes must match what the trace saw (they differ under nn.scan/nn.vmap)."""
    want = [("params", plan.layer, "kernel", plan.kernel_shape),
            ("params", plan.layer, "bias", plan.bias_shape),
            ("batch_stats", plan.batch_norm, "mean", plan.stat_shape),
            ("batch_stats", plan.batch_norm, "var", plan.stat_shape),
            ("params", plan.batch_norm, "scale", plan.stat_shape if plan.use_scale else None),
            ("params", plan.batch_norm, "bias", plan.stat_shape if plan.use_bias else None)]
    for col, path, name, shape in want:
        got = stored_shape(col, path, name)
        if got != shape:
            return (f"stored {col}/{path_name(path)}/{name} has shape {got}, the trace saw "
                    f"{shape} (lifted transforms such as nn.scan are not supported)")
    return None


def linen_stored_shape(variables: Mapping) -> StoredShape:
    """Looks up ``variables[collection][*path][name]``'s shape (None when absent)."""
    def stored_shape(collection: str, path: Path, name: str):
        node = variables.get(collection, {})
        for key in path:
            node = node.get(key, {}) if isinstance(node, Mapping) else {}
        return _shape(node.get(name)) if isinstance(node, Mapping) else None
    return stored_shape


def plan_linen(model: nn.Module, variables: Mapping, *args, **kwargs):
    """Traces ``model.apply(variables, *args, **kwargs)`` once and plans the fold.

    Returns:
      ``(pairs, skipped)``: a list of ``PairPlan`` and a list of ``SkippedBatchNorm``.
    """
    layers, bns, uses = _trace(model, variables, args, kwargs)
    return plan_calls(layers, bns, uses, linen_stored_shape(variables))


def plan_calls(layers: list[LayerCall], bns: list[BNCall], uses: dict,
               stored_shape: StoredShape):
    """Decides, from the recorded calls and the jaxpr's consumers, which pairs to fold.

    A pair is folded only if every call of the BatchNorm is fed exclusively by the same
    layer, in inference mode, and that layer is called exactly as often.

    Returns:
      ``(pairs, skipped)``: a list of ``PairPlan`` and a list of ``SkippedBatchNorm``.
    """
    bn_calls: dict[Path, list[BNCall]] = defaultdict(list)
    for bn in bns:
        bn_calls[bn.path].append(bn)
    layer_calls: dict[Path, int] = defaultdict(int)
    for layer in layers:
        layer_calls[layer.path] += 1

    pairs, skipped, claimed = [], [], defaultdict(list)
    for path, calls in bn_calls.items():
        first = calls[0]
        reason = next((r for r in (problem(c, uses) for c in calls) if r), None)
        lpaths = {c.layer.path for c in calls if c.layer is not None}
        if reason is None and len(lpaths) > 1:
            reason = "it is fed by different layers in different calls"
        if reason is None and layer_calls[first.layer.path] != len(calls):
            reason = (f"{path_name(first.layer.path)} is called {layer_calls[first.layer.path]}"
                      f" times but feeds this BatchNorm in {len(calls)}")
        if reason is not None:
            lname = path_name(first.layer.path) if first.layer is not None else None
            skipped.append(SkippedBatchNorm(path_name(path), lname, reason))
            continue
        kb, bb = _bcast(first, first.layer)
        plan = PairPlan(first.layer.path, path, first.epsilon, first.stat_dtype,
                        first.layer.kernel_shape, first.layer.bias_shape, first.stat_shape,
                        kb, bb, first.use_scale, first.use_bias)
        reason = _check_stored(plan, stored_shape)
        if reason is not None:
            skipped.append(SkippedBatchNorm(path_name(path), path_name(plan.layer), reason))
            continue
        claimed[plan.layer].append(plan)
    for layer_path, plans in claimed.items():
        if len(plans) == 1:
            pairs.append(plans[0])
            continue
        for p in plans:  # a shared layer feeding several BatchNorms: no single fold fits all
            skipped.append(SkippedBatchNorm(path_name(p.batch_norm), path_name(layer_path),
                                            "its layer also feeds another BatchNorm"))
    return pairs, skipped
