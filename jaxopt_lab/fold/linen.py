"""``bn_fold`` for Flax linen: fold every BatchNorm into the Conv/Dense that feeds it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import FrozenDict, freeze, unfreeze

from jaxopt_lab.fold import arith
from jaxopt_lab.fold.plan import PairPlan, Path, path_name
from jaxopt_lab.fold.report import FoldedPair, FoldReport, warn_if_training
from jaxopt_lab.fold.trace import plan_linen

Variables = Any


def _get(tree: Mapping, collection: str, path: Path, name: str):
    node = tree.get(collection, {})
    for key in path:
        node = node[key]
    return node.get(name)


def _set(tree: dict, collection: str, path: Path, name: str, value) -> None:
    """Sets a leaf, copying the dicts along the way so the input tree is never mutated."""
    node = tree[collection] = dict(tree[collection])
    for key in path:
        node[key] = dict(node[key])
        node = node[key]
    node[name] = value


def _like(new: np.ndarray, old):
    """``new`` as the same kind of array as ``old`` (a jax.Array keeps its sharding)."""
    if isinstance(old, jax.Array):
        return jax.device_put(new, old.sharding)
    return new


def _check_float(plan: PairPlan, kernel) -> None:
    dtype = getattr(kernel, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):  # bf16 too
        raise ValueError(
            f"params/{path_name(plan.layer)}/kernel must be a floating-point array to fold "
            f"into, got {type(kernel).__name__} of dtype {dtype} (fold before quantizing)"
        )


def _fold_pair(out: dict, plan: PairPlan) -> str:
    kernel = _get(out, "params", plan.layer, "kernel")
    _check_float(plan, kernel)
    bias = _get(out, "params", plan.layer, "bias") if plan.bias_shape is not None else None
    mean = _get(out, "batch_stats", plan.batch_norm, "mean")
    var = _get(out, "batch_stats", plan.batch_norm, "var")
    scale = _get(out, "params", plan.batch_norm, "scale") if plan.use_scale else None
    beta = _get(out, "params", plan.batch_norm, "bias") if plan.use_bias else None
    try:
        res = arith.fold(arith.FoldInputs(
            kernel=np.asarray(kernel), bias=None if bias is None else np.asarray(bias),
            mean=np.asarray(mean), var=np.asarray(var),
            scale=None if scale is None else np.asarray(scale),
            beta=None if beta is None else np.asarray(beta),
            epsilon=plan.epsilon, stat_dtype=plan.stat_dtype,
            kernel_shape=plan.kernel_bcast, bias_shape=plan.bias_bcast,
        ))
    except ValueError as e:
        raise ValueError(f"cannot fold BatchNorm {path_name(plan.batch_norm)} into "
                         f"{path_name(plan.layer)}: {e}") from None
    _set(out, "params", plan.layer, "kernel", _like(res.kernel, kernel))
    if bias is not None:
        _set(out, "params", plan.layer, "bias", _like(res.bias, bias))
    _set(out, "batch_stats", plan.batch_norm, "mean", _like(res.mean, mean))
    _set(out, "batch_stats", plan.batch_norm, "var", _like(res.var, var))
    if scale is not None:
        _set(out, "params", plan.batch_norm, "scale", _like(res.scale, scale))
    if beta is not None:
        _set(out, "params", plan.batch_norm, "bias", _like(res.beta, beta))
    return res.shift_in


_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def _check_leaves(node, path: str) -> None:
    """Every leaf must be a plain array: a QTensor, say, means the fold comes too late."""
    if isinstance(node, Mapping):
        for key, child in node.items():
            _check_leaves(child, f"{path}/{key}" if path else str(key))
    elif not isinstance(node, _ARRAY_TYPES):
        raise TypeError(f"{path} must be an array, got {type(node).__name__} (fold batch norm "
                        "before quantizing or other transforms that replace arrays)")


def _check_inputs(model, variables) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("variables must be a linen variables dict with a 'params' collection, "
                        f"got {type(variables).__name__}")
    _check_leaves(variables, "")


def _shift_in(plan: PairPlan) -> str:
    if plan.bias_shape is not None:
        return arith.SHIFT_IN_LAYER
    return arith.SHIFT_IN_BN_BIAS if plan.use_bias else arith.SHIFT_IN_BN_MEAN


def _plan(model, variables, args, kwargs) -> tuple[list[PairPlan], FoldReport]:
    _check_inputs(model, variables)
    pairs, skipped = plan_linen(model, variables, *args, **kwargs)
    folded = tuple(FoldedPair(path_name(p.layer), path_name(p.batch_norm), _shift_in(p))
                   for p in pairs)
    return pairs, FoldReport(folded, tuple(skipped))


def bn_fold_report(model: nn.Module, variables: Variables, *example_args,
                   **example_kwargs) -> FoldReport:
    """Which BatchNorms ``bn_fold`` would fold (and why the others would be left), no folding.

    Args:
      model: the linen module.
      variables: its variables (``{"params": ..., "batch_stats": ...}``).
      *example_args: example inputs, as for ``model.apply``.
      **example_kwargs: keyword arguments selecting inference mode, e.g. ``train=False``.

    Returns:
      A ``FoldReport``; ``shift_in`` is where the shift would go.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_lab as jol
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)])
      >>> x = jnp.ones((2, 3))
      >>> v = model.init(jax.random.PRNGKey(0), x)
      >>> [(p.layer, p.batch_norm) for p in jol.bn_fold_report(model, v, x).folded]
      [('layers_0', 'layers_1')]
    """
    return _plan(model, variables, example_args, example_kwargs)[1]


def bn_fold(model: nn.Module, variables: Variables, *example_args,
            return_report: bool = False, **example_kwargs):
    """Folds every BatchNorm fed directly by a Conv/ConvTranspose/Dense/DenseGeneral.

    The model is traced once on the example inputs to find the pairs (tensor identity, and
    the layer's output must have no other consumer). For each pair, with
    ``m = g / sqrt(v + eps)`` per output channel, ``W' = W * m`` and
    ``b' = beta + (b - mu) * m``; the BatchNorm is left as an exact identity plus that shift
    (``mean = 0``, ``var + eps == 1`` exactly, ``scale = 1``). If the layer has no bias the
    shift stays in the BatchNorm (its bias, or its mean if it has no bias either), so the
    *unchanged* model code gives the same output: ``model.apply(folded, x, train=False)``.
    Pairs that cannot be folded (BatchNorm in training mode, feature axes that are not the
    layer's output features, a layer output that is also used elsewhere) are left untouched
    and listed in the report. Folding twice is a no-op.

    Args:
      model: the linen module (its code is not changed). An NNX module is accepted too:
        ``bn_fold(module, x)`` is `bn_fold_nnx` ``(module, x)`` and returns a folded
        module.
      variables: ``{"params": ..., "batch_stats": ...}`` (a dict or FrozenDict); for an
        NNX module, the first example input (or ``None``).
      *example_args: example inputs, as for ``model.apply`` (shapes matter, values do not).
      return_report: also return a ``FoldReport`` of what was folded and what was not.
      **example_kwargs: keyword arguments putting the model in inference mode, e.g.
        ``train=False``; also passed to ``model.apply`` (``rngs``, ``method``).

    Returns:
      The folded variables (same structure and dtypes), or ``(folded, report)``.

    Raises:
      TypeError: if ``model`` is not a linen Module, ``variables`` has no ``params``, or a
        leaf is not an array (a ``QTensor``, say: fold before quantizing); names the path.
      ValueError: naming the pair, if its statistics are not finite or ``var + eps <= 0``,
        or its kernel is not a floating-point array.

    Warns:
      UserWarning: if BatchNorms were left unfolded because the trace ran them in training
        mode (the eval keyword arguments were probably forgotten).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_lab as jol
      >>> model = nn.Sequential([nn.Conv(4, (3, 3)), nn.BatchNorm(use_running_average=True)])
      >>> x = jnp.ones((1, 8, 8, 3))
      >>> v = model.init(jax.random.PRNGKey(0), x)
      >>> folded, report = jol.bn_fold(model, v, x, return_report=True)
      >>> bool(jnp.allclose(model.apply(folded, x), model.apply(v, x), atol=1e-5))
      True
      >>> report.folded[0].shift_in
      'layer_bias'
    """
    from flax import nnx
    if isinstance(model, nnx.Module):  # the NNX path takes the module and its inputs
        from jaxopt_lab.fold.nnx import bn_fold_nnx
        args = example_args if variables is None else (variables, *example_args)
        return bn_fold_nnx(model, *args, return_report=return_report, **example_kwargs)
    pairs, report = _plan(model, variables, example_args, example_kwargs)
    warn_if_training(report)
    frozen = isinstance(variables, FrozenDict)
    out = dict(unfreeze(variables) if frozen else variables)
    for plan in pairs:
        _fold_pair(out, plan)
    out = freeze(out) if frozen else out
    return (out, report) if return_report else out
