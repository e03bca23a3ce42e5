"""Running a folded linen model with its identity BatchNorms skipped altogether."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.core.flax_hooks import intercept_linen, is_nnx
from jaxopt_lab.fold import arith
from jaxopt_lab.fold.linen import bn_fold_report
from jaxopt_lab.fold.plan import path_name
from jaxopt_lab.fold.report import FoldReport


def _concrete(*xs) -> bool:
    return all(x is None or not isinstance(x, jax.core.Tracer) for x in xs)


def _stat_dtype(module: nn.BatchNorm, var) -> np.dtype:
    return np.dtype(var.dtype if module.force_float32_reductions else module.param_dtype)


def _bypass(module: nn.BatchNorm, x, shift_in: str):
    """What an identity BatchNorm computes, minus the work: ``x``, ``x + bias`` or ``x - mean``.

    Raises:
      ValueError: if the BatchNorm's variables are concrete and not an identity-plus-shift
        (variables that did not come from ``bn_fold``).
    """
    mean = module.get_variable("batch_stats", "mean")
    var = module.get_variable("batch_stats", "var")
    scale = module.get_variable("params", "scale") if module.use_scale else None
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if _concrete(mean, var, scale) and not arith.is_identity(
        mean, var, scale, module.epsilon, _stat_dtype(module, var)
    ):
        raise ValueError(
            f"BatchNorm {path_name(module.scope.path)} is not an identity (var + eps != 1 or "
            "scale != 1): pass variables returned by bn_fold with their report"
        )
    feature_axes = tuple(a % x.ndim for a in
                         (module.axis if isinstance(module.axis, tuple) else (module.axis,)))
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    out_dtype = module.dtype or jnp.result_type(
        x, *(p for p in (scale, bias) if p is not None)
    )
    if shift_in == arith.SHIFT_IN_BN_BIAS:
        x = x + jnp.asarray(bias).reshape(bshape)
    elif shift_in == arith.SHIFT_IN_BN_MEAN:
        x = x - jnp.asarray(mean).reshape(bshape)
    elif _concrete(mean, bias) and not (np.all(np.asarray(mean) == 0) and (
            bias is None or np.all(np.asarray(bias) == 0))):
        raise ValueError(f"BatchNorm {path_name(module.scope.path)} has a nonzero shift but "
                         "the report says the shift is in the layer's bias")
    return jnp.asarray(x, out_dtype)


def folded_apply(model: nn.Module, variables: Mapping, *args, report: FoldReport | None = None,
                 **kwargs) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with folded BatchNorms not computed at all.

    Each BatchNorm listed in ``report.folded`` is replaced (through the hook layer's
    ``intercept_linen``; the model code is unchanged) by what it computes once
    folded: nothing (``x``), ``x + bias`` or ``x - mean`` depending on ``shift_in``.
    BatchNorms running in training mode are left alone.

    Without ``report`` the model is traced once more to rebuild it (``bn_fold_report``).
    Under ``jit`` pass ``report`` (from ``bn_fold(..., return_report=True)``): traced
    variables cannot be checked, so they are trusted to be the folded ones. With concrete
    variables every skipped BatchNorm is checked to be an identity first.

    Args:
      model: the linen module.
      variables: folded variables, as returned by ``bn_fold``.
      *args: inputs, as for ``model.apply``.
      report: the ``FoldReport`` of the fold that produced ``variables``.
      **kwargs: as for ``model.apply`` (``train=False``, ``rngs``, ``method``, ...).

    Returns:
      What ``model.apply`` returns.

    Raises:
      ValueError: if a BatchNorm to skip is not an identity in (concrete) ``variables``, or
        for an NNX module (``bn_fold_nnx(..., remove_batchnorms=True)`` already removes the
        folded BatchNorms from the module itself).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_lab as jol
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)])
      >>> x = jnp.ones((2, 3))
      >>> folded, report = jol.bn_fold(model, model.init(jax.random.PRNGKey(0), x), x,
      ...                              return_report=True)
      >>> fast = jax.jit(lambda v, x: jol.folded_apply(model, v, x, report=report))
      >>> bool(jnp.allclose(fast(folded, x), model.apply(folded, x), atol=1e-6))
      True
    """
    if is_nnx(model):
        raise ValueError("folded_apply runs linen modules; for an NNX module call "
                         "jol.bn_fold_nnx(module, x, remove_batchnorms=True) and then the "
                         "module itself")
    if report is None:
        if not _concrete(*jax.tree.leaves(variables)):
            raise ValueError("folded_apply under jit needs report= (from bn_fold(..., "
                             "return_report=True))")
        report = bn_fold_report(model, variables, *args, **kwargs)
    skip = {p.batch_norm: p.shift_in for p in report.folded}

    def handler(module, method_name, call, call_args, call_kwargs):
        if (method_name != "__call__" or not isinstance(module, nn.BatchNorm)
                or path_name(module.scope.path) not in skip):
            return call(*call_args, **call_kwargs)
        flag = call_args[1] if len(call_args) > 1 else call_kwargs.get("use_running_average")
        if not (module.use_running_average if flag is None else flag):
            return call(*call_args, **call_kwargs)
        x = call_args[0] if call_args else call_kwargs["x"]
        return _bypass(module, x, skip[path_name(module.scope.path)])

    with intercept_linen(handler):
        return model.apply(variables, *args, **kwargs)
