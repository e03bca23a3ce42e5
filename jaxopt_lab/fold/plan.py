"""Shared planning for batch-norm folding: call records, consumers, and which pairs fold.

The tracers (``trace.py`` for linen, ``nnx.py`` for NNX) record one ``LayerCall`` per
Conv/Dense output and one ``BNCall`` per BatchNorm input, tagging both with
``checkpoint_name`` (an identity that shows up in the jaxpr). ``consumers`` reads the jaxpr
to prove a layer's output has exactly one consumer, the BatchNorm, so folding cannot change
anything else (a residual that also reads the conv output, say); ``plan_calls`` then
decides pair by pair.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.extend.core as jex
import numpy as np

from jaxopt_lab.core import flax_hooks

from jaxopt_lab.fold.report import TRAINING_MODE, SkippedBatchNorm

Path = tuple[str, ...]
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


_VIEW_OPS = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "transpose", "rev",
                       "squeeze", "expand_dims", "copy", "copy_p"})


class Graph:
    """The traced call as a flat graph: which values are views of which leaf, who reads
    each value, and the avals."""

    def __init__(self, program):
        self.eqns, outputs = flax_hooks.flat_eqns(program)
        # operand axis -> leaf axis, for views that only permute or flip the leaf
        self.axes_of: dict[int, tuple[int, ...]] = {
            i: tuple(range(len(v.aval.shape)))
            for i, v in enumerate(program.closed.jaxpr.invars[:program.n_vars])}
        self.outputs = {v for v in outputs if isinstance(v, int)}
        self.view_of = {i: i for i in range(program.n_vars)}
        self.readers: dict[int, list] = defaultdict(list)
        self.aval: dict[int, Any] = {i: v.aval for i, v in
                                     enumerate(program.closed.jaxpr.invars)}
        for fe in self.eqns:
            self.aval.update(zip(fe.outs, (v.aval for v in fe.eqn.outvars)))
            for pos, v in enumerate(fe.ins):
                if isinstance(v, int):
                    self.readers[v].append((fe, pos))
            if fe.name in _VIEW_OPS and isinstance(fe.ins[0], int) and fe.ins[0] in self.view_of:
                self.view_of[fe.outs[0]] = self.view_of[fe.ins[0]]
                axes = self.axes_of.get(fe.ins[0])
                if axes is not None and fe.name == "transpose":
                    self.axes_of[fe.outs[0]] = tuple(axes[d] for d in fe.eqn.params["permutation"])
                elif axes is not None and fe.name in ("rev", "convert_element_type", "copy"):
                    self.axes_of[fe.outs[0]] = axes

    def leaf(self, v) -> int | None:
        return self.view_of.get(v) if isinstance(v, int) else None


def new_tag() -> str:
    """A fresh name for ``checkpoint_name``, unique within the process."""
    return f"{TAG_PREFIX}{next(_TAGS)}"


def path_name(path: Path) -> str:
    """``("block1", "Conv_0")`` -> ``"block1/Conv_0"``."""
    return "/".join(path)


def shape_of(x) -> tuple[int, ...] | None:
    return None if x is None else tuple(np.shape(x))


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


def problem(bn: BNCall, uses: dict) -> str | None:
    """Why this single BatchNorm call cannot be folded into its input layer, or None."""
    layer = bn.layer
    if layer is None:
        return "its input is not the direct output of a Conv/ConvTranspose/Dense/DenseGeneral"
    if not bn.eval_mode:
        return (f"{TRAINING_MODE} (batch statistics) in this trace; pass the eval "
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
