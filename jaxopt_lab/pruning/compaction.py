"""Physically remove pruned output channels: smaller variables and a smaller model.

How channels flow between layers is read from the model's jaxpr by the hook layer
(`jaxopt_lab.core.channels`), not from its classes: for any chain of linen or NNX
Dense/Conv layers (``DenseGeneral``, ``Einsum``, ``LinearGeneral`` too), each kernel's
output channels are followed through bias adds, BatchNorms, activations, pooling and
channels-last flattens to the next kernel that contracts them. A channel whose kernel
slice is entirely masked is *dead* once its bias and its BatchNorm's scale and bias are
zeroed too (`expand_channel_mask`): it is then exactly 0 where the next kernel reads it.
`compact` deletes dead channels from the kernel, from every leaf on the same channels
(bias, BatchNorm scale, bias, mean, variance) and the matching input rows of the next
kernel.

Channels are left in place, and listed with the reason in the `CompactReport`, where
removing them would change the function: the model's output, a residual add or a gate
mixing two layers' channels, attention, a normalisation over features, a reshape that
splits the channel axis, an activation that does not map 0 to 0 (``sigmoid``).

The widths of an NNX module are read from its parameters, so the compacted module is the
same module on smaller arrays. A linen module's widths are constructor fields (the
``features`` of ``nn.Dense`` inside an ``@nn.compact`` method), so a smaller linen model
needs ``resize=(model, widths) -> model`` or a ``model.resized(widths)`` method.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.core import channels, flax_hooks
from jaxopt_lab.core.mapping import path_names
from jaxopt_lab.pruning.transform import check_masks

Params = Any
Resize = Callable[[nn.Module, list], nn.Module]


class CompactedLayer(NamedTuple):
    """A kernel output axis that lost channels: ``layer`` (module path), ``axis`` (of the
    kernel), and the widths before and after."""

    layer: str
    axis: int
    before: int
    after: int


class SkippedLayer(NamedTuple):
    """A kernel output axis with dead channels left in place, and why."""

    layer: str
    axis: int
    dead: int
    reason: str


class CompactReport(NamedTuple):
    """What `compact` removed and what it could not."""

    compacted: tuple[CompactedLayer, ...]
    skipped: tuple[SkippedLayer, ...]


class _Plan(NamedTuple):
    program: flax_hooks.Program
    names: list
    masks: dict  # leaf index -> bool array (the mask's leaves, matched to the trace)
    alive: dict  # (kernel leaf, axis) -> bool array of kept channels, compactable only
    flow: channels.ChannelFlow
    skipped: tuple


def _layer(names) -> str:
    body = [n for n in names[:-1] if n not in ("params",)]
    return "/".join(body)


def _params_of(model: Any, variables: Any) -> Any:
    if flax_hooks.is_nnx(model):
        from flax import nnx
        if variables is not None:
            return variables
        return nnx.state(model, nnx.Param)
    if not isinstance(variables, dict) and not hasattr(variables, "keys"):
        raise ValueError(f"variables must be a linen variables dict, got {type(variables)}")
    return variables["params"]


def _prefix(model: Any) -> tuple[str, ...]:
    """Where the mask's tree sits in the traced variables."""
    return () if flax_hooks.is_nnx(model) else ("params",)


def _match_masks(names, mask, params, prefix) -> tuple[dict, Any]:
    """Mask leaves (checked against ``params``) keyed by the traced leaf they mask."""
    checked = check_masks(params, mask)
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for path, m in jax.tree_util.tree_flatten_with_path(checked)[0]:
        leaf = index.get(prefix + path_names(path))
        if leaf is None:
            raise ValueError(f"mask leaf {jax.tree_util.keystr(path)} is not a leaf of the "
                             "traced model's variables")
        out[leaf] = np.asarray(m, bool)
    return out, checked


def _plan(model, variables, mask, args, kwargs) -> tuple[_Plan, Any]:
    program = flax_hooks.trace(model, variables, *args, **kwargs)
    names = [path_names(p) for p in program.paths]
    masks, checked = _match_masks(names, mask, _params_of(model, variables), _prefix(model))
    flow = channels.channel_flow(program, zeroable=masks)
    alive, skipped = {}, []
    for leaf, axes in flow.kernels.items():
        if leaf not in masks:
            continue
        m = masks[leaf]
        for a in axes:
            keep = m.any(axis=tuple(d for d in range(m.ndim) if d != a))
            dead = int((~keep).sum())
            reason = flow.why_not((leaf, a))
            if reason is not None:
                if dead:
                    skipped.append(SkippedLayer(_layer(names[leaf]), a, dead, reason))
                continue
            if not keep.any():
                raise ValueError(f"layer {_layer(names[leaf])} would lose all its channels "
                                 f"(axis {a} of {'/'.join(names[leaf])} is fully masked)")
            alive[(leaf, a)] = keep
    return _Plan(program, names, masks, alive, flow, tuple(skipped)), checked


def _along(keep: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = keep.shape[0]
    return keep.reshape(shape)


def _expanded_leaf_masks(plan: _Plan) -> dict[int, np.ndarray]:
    out = {i: m.copy() for i, m in plan.masks.items()}
    for channel, keep in plan.alive.items():
        for leaf, axis in plan.flow.attached.get(channel, ()):
            if leaf in out:
                out[leaf] = out[leaf] & _along(keep, axis, out[leaf].ndim)
    return out


def _rebuild_mask(plan: _Plan, checked: Any, leaf_masks: dict[int, np.ndarray],
                  prefix: tuple[str, ...]) -> Params:
    index = {n: i for i, n in enumerate(plan.names)}
    flat, treedef = jax.tree_util.tree_flatten_with_path(checked)
    leaves = [jnp.asarray(leaf_masks[index[prefix + path_names(p)]]) for p, _ in flat]
    return jax.tree.unflatten(treedef, leaves)


def expand_channel_mask(model: Any, variables: Any, mask: Params, *example_args,
                        **example_kwargs) -> Params:
    """Extends kernel channel masks to each dead channel's bias and BatchNorm scale/bias.

    Args:
      model: a linen module, or an NNX module.
      variables: linen variables (``{"params": ..., "batch_stats": ...}``); for NNX
        ``None`` (the module's state) or the state the mask covers.
      mask: a mask tree over ``variables["params"]`` (linen) or over
        ``nnx.state(module, nnx.Param)`` (NNX), e.g. from `channel_mask`.
      example_args, example_kwargs: (``*example_args, **example_kwargs``) an example call, e.g. ``x[:1], train=False``.

    Returns:
      The mask with, for every output channel whose kernel slice is all False and that
      `compact` can remove, the leaves on the same channels (bias, BatchNorm scale and
      bias) set False too: ``apply_mask(params, expanded)`` makes those channels 0 where
      the next kernel reads them.
    """
    plan, checked = _plan(model, variables, mask, example_args, example_kwargs)
    return _rebuild_mask(plan, checked, _expanded_leaf_masks(plan), _prefix(model))


def compact_report(model: Any, variables: Any, mask: Params, *example_args,
                   **example_kwargs) -> CompactReport:
    """What `compact` would remove, and which dead channels it would leave and why.

    Takes the arguments of `expand_channel_mask`; nothing is resized or copied.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_lab as jol
      >>> from jaxopt_lab.pruning.compaction import compact_report
      >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((1, 3))
      >>> v = model.init(jax.random.PRNGKey(0), x)
      >>> m = jax.tree.map(lambda w: w != 0, v["params"])
      >>> m["layers_0"]["kernel"] = m["layers_0"]["kernel"].at[:, 0].set(False)
      >>> compact_report(model, v, m, x).compacted
      (CompactedLayer(layer='layers_0', axis=1, before=4, after=3),)
    """
    plan, _ = _plan(model, variables, mask, example_args, example_kwargs)
    return CompactReport(tuple(
        CompactedLayer(_layer(plan.names[leaf]), a, keep.shape[0], int(keep.sum()))
        for (leaf, a), keep in plan.alive.items() if not keep.all()), plan.skipped)


def _default_resize(model: nn.Module, widths: list) -> nn.Module:
    # A model that knows how to rebuild itself narrower says so with a `resized` method
    # (the bundled reference models do); the library holds no knowledge of model classes.
    if callable(getattr(model, "resized", None)):
        return model.resized(widths)
    raise TypeError(
        f"compact does not know how to resize the linen module {type(model).__name__} (its "
        "widths are constructor fields); pass resize=lambda model, widths: model.clone(...) "
        "(widths: output channels per kernel, in call order, the model's output layers left "
        "out), or use an NNX module, whose widths are read from its parameters"
    )


def _take(x: np.ndarray, keep: np.ndarray, axis: int, outer: int = 1,
          inner: int = 1) -> np.ndarray:
    c = keep.shape[0]
    if x.shape[axis] != outer * c * inner:
        raise ValueError(f"axis {axis} of shape {x.shape} is not {outer} x {c} x {inner}")
    lead, rest = x.shape[:axis], x.shape[axis + 1:]
    y = x.reshape(*lead, outer, c, inner, *rest)
    y = np.compress(keep, y, axis=axis + 1)
    return y.reshape(*lead, -1, *rest)


def _widths(plan: _Plan, leaves) -> list:
    out = []
    for leaf, axes in plan.flow.kernels.items():
        if any((leaf, a) in plan.flow.outputs for a in axes):
            continue
        shape = np.shape(leaves[leaf])
        ws = tuple(int(shape[a]) for a in axes)
        out.append(ws[0] if len(ws) == 1 else ws)
    return out


def _fix_nnx_widths(module) -> None:
    """Keeps stock NNX layers' width attributes in line with their compacted arrays
    (``LinearGeneral`` and ``Einsum`` reshape with them when called)."""
    from flax import nnx

    def shape(m, name):
        v = getattr(m, name, None)
        return tuple(v[...].shape) if isinstance(v, nnx.Variable) else None

    for _, m in nnx.iter_modules(module):
        kernel, bias = shape(m, "kernel"), shape(m, "bias")
        if kernel is not None and isinstance(getattr(m, "kernel_shape", None), tuple):
            m.kernel_shape = kernel
        if bias is not None and isinstance(getattr(m, "bias_shape", None), tuple):
            m.bias_shape = bias
        if isinstance(m, nnx.LinearGeneral) and kernel is not None:
            n_out, n_in = len(m.out_features), len(m.in_features)
            m.out_features = kernel[len(kernel) - n_out:]
            m.in_features = kernel[len(kernel) - n_out - n_in:len(kernel) - n_out]
        elif isinstance(m, (nnx.Linear, nnx.Conv)) and kernel is not None:
            groups = getattr(m, "feature_group_count", 1) or 1
            m.in_features, m.out_features = kernel[-2] * groups, kernel[-1]
        elif isinstance(getattr(m, "num_features", None), int):
            stat = shape(m, "scale") or shape(m, "mean") or shape(m, "bias")
            if stat:
                m.num_features = stat[-1]


def compact(
    model: Any,
    variables: Any,
    mask: Params,
    *example_args,
    resize: Resize | None = None,
    return_report: bool = False,
    **example_kwargs,
) -> Any:
    """Removes fully-masked output channels; returns ``(smaller_model, smaller_variables)``.

    ``smaller_model.apply(smaller_variables, x)`` (NNX: ``smaller_model(x)``) equals the
    model on its variables masked with `expand_channel_mask` (other masked entries are
    zeroed too), exactly: the removed channels were exact zeros.

    Args:
      model: a linen module or an NNX module, built from any Dense/Conv layers (see the
        module docstring for what stops a channel from being removed).
      variables: linen variables (every collection, ``batch_stats`` too, is compacted);
        for NNX ``None`` (the module's own state) or its state.
      mask: a mask tree over ``variables["params"]`` (linen) or
        ``nnx.state(module, nnx.Param)`` (NNX); a channel goes when its whole kernel slice
        is False. Channels that reach the model's output are never removed.
      example_args, example_kwargs: (``*example_args, **example_kwargs``) an example call, e.g. ``x[:1]`` (shapes only).
      resize: linen only: ``(model, widths) -> model`` where ``widths`` lists the kept
        output channels of every kernel in call order, except those whose output is the
        model's (an int, or a tuple for a kernel with several output axes). Default:
        ``model.resized(widths)`` for models that define it. Not needed when nothing is
        removed, nor for NNX (widths are read from the parameters).
      return_report: also return a `CompactReport`.

    Returns:
      ``(smaller_model, smaller_variables)`` (NNX: the compacted module and its state),
      plus the report when ``return_report``.

    Raises:
      ValueError: the mask does not match the params, a layer would lose every channel,
        or the resized linen model's shapes disagree with the compacted variables.
      TypeError: a linen model with channels to remove, no ``resize`` and no
        ``resized`` method.

    Warns:
      UserWarning: dead channels left in place (not counting the model's output layers),
        with the reason, e.g. a residual add.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> model = jol.app.MLP(hidden=(8,))
      >>> x = jnp.ones((2, 4))
      >>> v = model.init(jax.random.PRNGKey(0), x)
      >>> m = jol.channel_mask(v["params"], 0.5, where=lambda p, w: "Dense_0" in str(p))
      >>> small, sv = jol.compact(model, v, m, x)
      >>> small.hidden, sv["params"]["Dense_0"]["kernel"].shape
      ((4,), (4, 4))
    """
    plan, _ = _plan(model, variables, mask, example_args, example_kwargs)
    program, flow = plan.program, plan.flow
    leaf_masks = _expanded_leaf_masks(plan)
    leaves = list(program.leaves)  # untouched leaves (NNX rng keys...) stay as they are
    for i, m in leaf_masks.items():
        arr = np.asarray(leaves[i])
        leaves[i] = np.where(m, arr, np.zeros_like(arr))
    compacted = []
    for (leaf, a), keep in plan.alive.items():
        if keep.all():
            continue
        before = keep.shape[0]
        leaves[leaf] = _take(np.asarray(leaves[leaf]), keep, a)
        for other, axis in flow.attached.get((leaf, a), ()):
            leaves[other] = _take(np.asarray(leaves[other]), keep, axis)
        for e in flow.edges[(leaf, a)]:
            leaves[e.consumer] = _take(np.asarray(leaves[e.consumer]), keep, e.consumer_axis,
                                       e.outer, e.inner)
        compacted.append(CompactedLayer(_layer(plan.names[leaf]), a, before, int(keep.sum())))
    report = CompactReport(tuple(compacted), plan.skipped)
    unexpected = [s for s in plan.skipped if s.reason != channels.OUTPUT]
    if unexpected:
        warnings.warn("compact left dead channels in place: " + "; ".join(
            f"{s.layer} axis {s.axis} ({s.dead} dead): {s.reason}" for s in unexpected[:5]),
            stacklevel=2)
    new_leaves = [x if x is o else jnp.asarray(x, dtype=o.dtype)
                  for x, o in zip(leaves, program.leaves)]
    new_vars = jax.tree.unflatten(program.var_treedef, new_leaves)
    if flax_hooks.is_nnx(model):
        from flax import nnx
        graphdef, _ = flax_hooks.nnx_variables(model, variables)
        small = nnx.merge(graphdef, new_vars)
        _fix_nnx_widths(small)
        out = (small, nnx.state(small))
    else:
        out = (_resized(model, plan, leaves, compacted, resize, example_args, example_kwargs,
                        new_vars), new_vars)
    return (*out, report) if return_report else out


def _resized(model, plan, leaves, compacted, resize, args, kwargs, new_vars):
    if not compacted:
        return model
    small = (resize or _default_resize)(model, _widths(plan, leaves))
    want = jax.eval_shape(lambda: small.init(jax.random.PRNGKey(0), *args, **kwargs))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), new_vars)
    if jax.tree.structure(want) != jax.tree.structure(got) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))
    ):
        raise ValueError(f"resized model {small} does not match the compacted parameter "
                         f"shapes (widths {_widths(plan, leaves)})")
    return small
