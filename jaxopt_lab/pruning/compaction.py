"""Physically remove pruned output channels: smaller dense params and a smaller model.

For a sequential linen model (Conv/Dense layers, each optionally followed by a
BatchNorm, with elementwise ops, pooling and a channels-last flatten in between, like
``TeacherCNN``, ``StudentCNN`` and ``MLP``), a channel whose kernel slice is entirely
masked is *dead* once its bias and its BatchNorm's scale and bias are zeroed too
(:func:`expand_channel_mask`): it then outputs exactly 0 after the activation.
:func:`compact` deletes dead channels from the layer, its BatchNorm, and the matching
input rows of the next layer, and returns a resized model computing the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.pruning.transform import apply_mask, check_masks

Params = Any
Resize = Callable[[nn.Module, list[int]], nn.Module]


@dataclasses.dataclass
class _Layer:
    path: tuple[str, ...]  # module path of the Conv/Dense
    bn: tuple[str, ...] | None  # the BatchNorm right after it, if any


def _trace_layers(model: nn.Module, variables: dict, example_args, example_kwargs) -> list[_Layer]:
    """Conv/Dense layers in call order, each with the BatchNorm that directly follows it."""
    calls: list[tuple[str, tuple[str, ...]]] = []

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
            calls.append(("layer", tuple(mod.path)))
        elif context.method_name == "__call__" and isinstance(mod, nn.BatchNorm):
            calls.append(("bn", tuple(mod.path)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, *example_args, **example_kwargs), variables)
    layers: list[_Layer] = []
    for kind, path in calls:
        if kind == "layer":
            layers.append(_Layer(path, None))
        elif layers and layers[-1].bn is None:
            layers[-1].bn = path
    return layers


def _get(tree: dict, path: Sequence[str]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _alive(kernel_mask: jax.Array) -> np.ndarray:
    m = np.asarray(kernel_mask, bool)
    return m.reshape(-1, m.shape[-1]).any(axis=0)


def _dead_channels(layers, mask) -> list[np.ndarray]:
    """Per layer except the last (whose outputs are the model's): alive channels."""
    return [_alive(_get(mask, layer.path)["kernel"]) for layer in layers[:-1]]


def expand_channel_mask(
    model: nn.Module, variables: dict, mask: Params, *example_args, **example_kwargs
) -> Params:
    """Extends kernel channel masks to each dead channel's bias and BatchNorm scale/bias.

    Args:
      model: the linen model. variables: its variables (``{"params": ...}``).
      mask: a mask tree over ``variables["params"]`` (e.g. from :func:`channel_mask`).
      *example_args, **example_kwargs: an example call, e.g. ``x[:1], train=False``.

    Returns:
      The mask with, for every output channel whose kernel slice is all False (except
      in the last layer), the layer's bias and the following BatchNorm's scale and bias
      set False too: ``apply_mask(params, expanded)`` makes those channels output 0.
    """
    layers = _trace_layers(model, variables, example_args, example_kwargs)
    return _expand(layers, variables["params"], mask)


def _expand(layers: list[_Layer], params: Params, mask: Params) -> Params:
    out = jax.tree.map(np.asarray, check_masks(params, mask))
    for layer, alive in zip(layers, _dead_channels(layers, out)):
        for path in filter(None, (layer.path, layer.bn)):
            node = _get(out, path)
            for name in ("bias", "scale"):
                if name in node and node[name].shape == alive.shape:
                    node[name] = node[name] & alive
    return jax.tree.map(jnp.asarray, out)


def _default_resize(model: nn.Module, widths: list[int]) -> nn.Module:
    # A model that knows how to rebuild itself narrower says so with a `resized` method
    # (the bundled reference models do); the library holds no knowledge of model classes.
    if callable(getattr(model, "resized", None)):
        return model.resized(widths)
    raise TypeError(
        f"compact does not know how to resize {type(model).__name__}; pass "
        "resize=lambda model, widths: model.clone(...) (widths: kept channels per layer)"
    )


def _take_rows(kernel: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Keeps the input rows of a consumer kernel that read alive channels.

    The input axis (-2) may be a channels-last flatten of ``spatial x channels``.
    """
    c = alive.shape[0]
    rows = kernel.shape[-2]
    if rows % c:
        raise ValueError(f"consumer kernel has {rows} inputs, not a multiple of {c} channels")
    lead, out = kernel.shape[:-2], kernel.shape[-1]
    k = kernel.reshape(*lead, rows // c, c, out)[..., alive, :]
    return k.reshape(*lead, -1, out)


def compact(
    model: nn.Module,
    variables: dict,
    mask: Params,
    *example_args,
    resize: Resize | None = None,
    **example_kwargs,
) -> tuple[nn.Module, dict]:
    """Removes fully-masked output channels; returns ``(smaller_model, smaller_variables)``.

    ``smaller_model.apply(smaller_variables, x)`` equals ``model.apply`` on the variables
    masked with :func:`expand_channel_mask` (other masked entries are zeroed too).

    Args:
      model: a sequential linen model of Conv/Dense layers.
      variables: its variables; every collection (``batch_stats``...) is compacted.
      mask: a mask tree over ``variables["params"]``; a channel goes when its whole
        kernel slice is False. The last layer's outputs are never removed.
      *example_args, **example_kwargs: an example call, e.g. ``x[:1]``.
      resize: ``(model, widths) -> model``; ``widths`` are the kept output channels of
        every layer but the last, in call order. Default: ``model.resized(widths)`` for
        models that define it (the bundled reference models do).

    Raises:
      ValueError: the mask does not match the params, a layer would lose every channel,
        or the resized model's shapes disagree with the compacted params.
      TypeError: an unknown model class and no ``resize``.

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
    params = variables["params"]
    layers = _trace_layers(model, variables, example_args, example_kwargs)
    expanded = _expand(layers, params, mask)
    masked = {**variables, "params": apply_mask(params, expanded)}
    out = jax.tree.map(np.asarray, masked)
    widths = []
    for i, alive in enumerate(_dead_channels(layers, expanded)):
        layer, nxt = layers[i], layers[i + 1]
        if not alive.any():
            raise ValueError(f"layer {'/'.join(layer.path)} would lose all its channels")
        widths.append(int(alive.sum()))
        for collection in out.values():
            for path in filter(None, (layer.path, layer.bn)):
                try:
                    node = _get(collection, path)
                except (KeyError, TypeError):
                    continue
                for name, leaf in node.items():
                    if name == "kernel":
                        node[name] = leaf[..., alive]
                    elif leaf.shape == alive.shape:
                        node[name] = leaf[alive]
        consumer = _get(out["params"], nxt.path)
        consumer["kernel"] = _take_rows(consumer["kernel"], alive)
    small = (resize or _default_resize)(model, widths)
    small_vars = jax.tree.map(jnp.asarray, out)
    want = jax.eval_shape(lambda: small.init(jax.random.PRNGKey(0), *example_args,
                                             **example_kwargs))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), small_vars)
    if jax.tree.structure(want) != jax.tree.structure(got) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))
    ):
        raise ValueError(f"resized model {small} does not match the compacted parameter shapes")
    return small, small_vars
