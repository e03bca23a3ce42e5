"""Intermediate features of an unchanged Flax linen model, and FitNets projections.

:func:`capture_features` runs ``model.apply`` with Flax's own ``capture_intermediates``
(a module *output* is what is wanted here, not an op, so Flax's mechanism is the right one
and jaxopt_lab's hook layer is not involved), keeping only the outputs of the requested
submodules plus anything the model ``sow``-s into ``"intermediates"``. Layers are
named by their module path joined with ``/`` (``"BatchNorm_1"``,
``"block_0/Conv_0"``); a sown value is named by its module path and sow name.

When the student's channels ``D_s`` differ from the teacher's ``D_t``, a small learnable
linear map (:func:`init_projection`, applied by :func:`project`; a 1x1 convolution for
image features) takes the student's features to the teacher's width.

Examples:
  >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
  >>> model = jol.app.StudentCNN(); x = jnp.zeros((2, 8, 8, 1))
  >>> variables = model.init(jax.random.PRNGKey(0), x)
  >>> logits, feats = jol.distill.capture_features(model, variables, x, layers=["BatchNorm_0"])
  >>> feats["BatchNorm_0"].shape
  (2, 8, 8, 16)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any
LayerSelector = Sequence[str] | Callable[[str], bool]

_COLLECTION = "intermediates"


def _wants(layers: LayerSelector) -> Callable[[str], bool]:
    if callable(layers):
        return layers
    if isinstance(layers, str):
        raise ValueError(f"layers must be a sequence of layer names, got the string {layers!r}")
    wanted = frozenset(layers)
    return lambda name: name in wanted


def _flatten(intermediates: Mapping) -> dict[str, Any]:
    """``{"a": {"b": {"__call__": (v,)}}}`` -> ``{"a/b": (v,)}``; sown names kept as leaves."""
    out = {}

    def visit(node, path):
        for key, value in node.items():
            if isinstance(value, Mapping):
                visit(value, (*path, key))
            elif key == "__call__":
                if path:  # the root's own output is the model output, returned anyway
                    out["/".join(path)] = value
            else:
                out["/".join((*path, key))] = value

    visit(intermediates, ())
    return out


def layer_names(model: nn.Module, variables: Mapping, *args, **kwargs) -> list[str]:
    """Names of every submodule output (and sown value) that :func:`capture_features` can
    return, found by tracing ``model.apply`` abstractly (no FLOPs spent)."""

    def run(v, *a):
        # mutable=True: train-mode calls may also update e.g. batch_stats.
        _, state = model.apply(v, *a, capture_intermediates=True, mutable=True, **kwargs)
        return dict(state).get(_COLLECTION, {})

    return sorted(_flatten(jax.eval_shape(run, variables, *args)))


def capture_features(
    model: nn.Module,
    variables: Mapping,
    *args: Any,
    layers: LayerSelector,
    mutable: bool | str | Sequence[str] = False,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """Runs ``model.apply`` and also returns the outputs of the chosen submodules.

    The model code is not touched: outputs are recorded through Flax's method
    interception while the model runs, so this works under ``jit``, ``grad``, ``vmap``
    and ``pmap`` like a plain ``apply``.

    Args:
      model: a Flax linen module.
      variables: its variables (``{"params": ..., "batch_stats": ...}``).
      *args: positional inputs of the model (e.g. the batch ``x``).
      layers: layer names (module paths joined by ``"/"``, see :func:`layer_names`)
        or a predicate ``name -> bool``.
      mutable: as in ``model.apply``, e.g. ``["batch_stats"]`` in train mode.
      **kwargs: other keyword arguments of the model (``train=False``, ``rngs=...``).

    Returns:
      ``(result, features)``: ``result`` is exactly what ``model.apply`` returns with
      this ``mutable`` (``out`` or ``(out, updated_collections)``, without the captured
      ones); ``features`` maps each captured layer name to its output.

    Raises:
      ValueError: a named layer does not exist (the message lists the ones that do) or
        was called more than once in the forward pass (its output is ambiguous).
    """
    wants = _wants(layers)
    if mutable is True:
        raise ValueError("mutable=True is not supported; name the collections to update")
    user_mutable = [] if mutable is False else [mutable] if isinstance(mutable, str) else list(
        mutable
    )

    def capture(mdl: nn.Module, method_name: str) -> bool:
        return method_name == "__call__" and wants("/".join(mdl.path))

    out, state = model.apply(
        variables, *args, capture_intermediates=capture,
        mutable=[*user_mutable, _COLLECTION], **kwargs,
    )
    state = dict(state)
    captured = _flatten(state.pop(_COLLECTION, {}))
    if not callable(layers):
        missing = [name for name in layers if name not in captured]
        if missing:
            known = layer_names(model, variables, *args, **kwargs)
            raise ValueError(f"layers {missing} not found in {type(model).__name__}; "
                             f"known layers: {known}")
    features = {}
    for name, calls in captured.items():
        if not wants(name):
            continue
        if len(calls) != 1:
            raise ValueError(
                f"layer {name!r} ran {len(calls)} times in one forward pass; its output is "
                "ambiguous, capture a layer that runs once"
            )
        features[name] = calls[0]
    return (out, state) if user_mutable else out, features


def init_projection(
    key: jax.Array, in_features: int, out_features: int, *, use_bias: bool = True,
    dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
    """A FitNets regressor taking ``in_features`` student channels to ``out_features``.

    The kernel is LeCun-normal (as ``flax.linen.Dense``), the bias zero. Put it into the
    trained parameters so it learns with the student.

    Raises:
      ValueError: non-positive widths.
    """
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"projection widths must be positive, got {in_features} -> {out_features}")
    kernel = nn.initializers.lecun_normal()(key, (in_features, out_features), dtype)
    params = {"kernel": kernel}
    if use_bias:
        params["bias"] = jnp.zeros((out_features,), dtype)
    return params


def project(projection: Mapping[str, jax.Array], features: jax.typing.ArrayLike) -> jax.Array:
    """Applies a projection from :func:`init_projection` to the last axis of ``features``.

    Raises:
      ValueError: a kernel that is not 2-D or whose input width is not ``features``'.
    """
    kernel = jnp.asarray(projection["kernel"])
    features = jnp.asarray(features)
    if kernel.ndim != 2:
        raise ValueError(f"projection['kernel'] must be 2-D (in, out), got shape {kernel.shape}")
    if features.ndim < 1 or features.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"projection['kernel'] expects {kernel.shape[0]} input channels, features have "
            f"shape {features.shape}"
        )
    out = jnp.tensordot(features, kernel, axes=1)
    bias = projection.get("bias")
    if bias is not None:
        out = out + jnp.asarray(bias).reshape((1,) * (out.ndim - 1) + (-1,))
    return out
