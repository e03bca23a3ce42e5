"""``bn_fold_nnx``: batch-norm folding for Flax NNX modules.

NNX has no method interceptors, so the trace temporarily wraps ``__call__`` of the NNX
layer classes (under a lock, restored afterwards) on a copy of the module, records outputs
and inputs by tensor identity exactly as the linen path does, and reuses its planning and
arithmetic. The input module is never modified: a folded copy is returned.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxopt_lab.fold import arith
from jaxopt_lab.fold.plan import (
    BNCall,
    LayerCall,
    PairPlan,
    Path,
    consumers,
    new_tag,
    path_name,
    plan_calls,
)
from jaxopt_lab.fold.report import FoldedPair, FoldReport, warn_if_training

LAYER_TYPES = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral)
_PATCH_LOCK = threading.Lock()


def _variable_shape(v) -> tuple[int, ...] | None:
    return None if v is None else tuple(np.shape(v[...]))


def _record_layer(module, y, paths, layers: list):
    if not isinstance(y, jax.Array) or y.ndim == 0 or id(module) not in paths:
        return y
    tag = new_tag()
    y = checkpoint_name(y, tag)
    k = len(module.out_features) if isinstance(module, nnx.LinearGeneral) else 1
    layers.append(LayerCall(
        path=paths[id(module)], out=y, tag=tag, feature_axes=tuple(range(y.ndim - k, y.ndim)),
        kernel_shape=_variable_shape(module.kernel), bias_shape=_variable_shape(module.bias),
        kernel_features_last=not (isinstance(module, nnx.ConvTranspose)
                                  and module.transpose_kernel),
    ))
    return y


def _record_bn(module, args, kwargs, paths, layers: list, bns: list):
    args = list(args)
    x = args[0] if args else kwargs["x"]
    flag = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    eval_mode = bool(module.use_running_average if flag is None else flag)
    layer = next((c for c in reversed(layers) if c.out is x), None)
    tag = None
    if layer is not None:
        tag = new_tag()
        x = checkpoint_name(x, tag)
        if args:
            args[0] = x
        else:
            kwargs = {**kwargs, "x": x}
    # NNX promotes x and every statistic to one dtype before computing var + eps.
    present = [v[...] for v in (module.mean, module.var, module.scale, module.bias)
               if v is not None]
    stat_dtype = np.dtype(module.dtype or jnp.result_type(x, *present))
    axes = tuple(sorted(a % x.ndim for a in (module.axis if isinstance(module.axis, tuple)
                                             else (module.axis,))))
    bns.append(BNCall(
        path=paths[id(module)], layer=layer, tag=tag, eval_mode=eval_mode, axes=axes,
        in_shape=tuple(x.shape), epsilon=float(module.epsilon), stat_dtype=stat_dtype,
        stat_shape=tuple(x.shape[a] for a in axes),
        use_scale=module.scale is not None, use_bias=module.bias is not None,
    ))
    return args, kwargs


@contextlib.contextmanager
def _recording(paths: dict, layers: list, bns: list):
    """Wraps the NNX layer classes' ``__call__`` for the duration of one trace."""
    originals = {cls: cls.__call__ for cls in (*LAYER_TYPES, nnx.BatchNorm)}

    def layer_call(orig):
        def call(self, *args, **kwargs):
            return _record_layer(self, orig(self, *args, **kwargs), paths, layers)
        return call

    def bn_call(self, *args, **kwargs):
        if id(self) not in paths:
            return originals[nnx.BatchNorm](self, *args, **kwargs)
        args, kwargs = _record_bn(self, args, kwargs, paths, layers, bns)
        return originals[nnx.BatchNorm](self, *args, **kwargs)

    with _PATCH_LOCK:
        try:
            for cls in LAYER_TYPES:
                cls.__call__ = layer_call(originals[cls])
            nnx.BatchNorm.__call__ = bn_call
            yield
        finally:
            for cls, orig in originals.items():
                cls.__call__ = orig


def _modules(module: nnx.Module) -> dict[Path, nnx.Module]:
    return {tuple(str(k) for k in p): m for p, m in nnx.iter_modules(module)}


def _plan(module: nnx.Module, args, kwargs):
    graphdef, state = nnx.split(module)
    layers: list[LayerCall] = []
    bns: list[BNCall] = []

    def run(state):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        paths = {id(m): p for p, m in _modules(copy).items()}
        with _recording(paths, layers, bns):
            return copy(*args, **kwargs)

    uses = consumers(jax.make_jaxpr(run)(state))
    modules = _modules(module)

    def stored_shape(collection: str, path: Path, name: str):
        del collection
        return _variable_shape(getattr(modules.get(path), name, None))

    return plan_calls(layers, bns, uses, stored_shape)


def _fold_pair(modules: dict, plan: PairPlan) -> str:
    layer, bn = modules[plan.layer], modules[plan.batch_norm]
    get = lambda v: None if v is None else np.asarray(v[...])  # noqa: E731
    kernel = get(layer.kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):  # bfloat16 too
        raise ValueError(f"{path_name(plan.layer)}.kernel must be floating-point to fold into, "
                         f"got dtype {kernel.dtype}")
    try:
        res = arith.fold(arith.FoldInputs(
            kernel=kernel, bias=get(layer.bias), mean=get(bn.mean), var=get(bn.var),
            scale=get(bn.scale), beta=get(bn.bias), epsilon=plan.epsilon,
            stat_dtype=plan.stat_dtype, kernel_shape=plan.kernel_bcast, bias_shape=plan.bias_bcast,
        ))
    except ValueError as e:
        raise ValueError(f"cannot fold BatchNorm {path_name(plan.batch_norm)} into "
                         f"{path_name(plan.layer)}: {e}") from None
    for var, value in ((layer.kernel, res.kernel), (layer.bias, res.bias), (bn.mean, res.mean),
                       (bn.var, res.var), (bn.scale, res.scale), (bn.bias, res.beta)):
        if var is not None:
            var.set_value(jnp.asarray(value))
    return res.shift_in


class FoldedBatchNorm(nnx.Module):
    """Stands in for a folded ``nnx.BatchNorm``: adds the shift it carried, nothing else.

    Only inference is meaningful (a folded BatchNorm has no statistics left to use).
    """

    def __init__(self, shift: jax.Array | None, axis: int, dtype: Any = None):
        self.shift = None if shift is None else nnx.Param(shift)
        self.axis = axis
        self.dtype = dtype

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        del use_running_average, mask
        if self.shift is not None:
            shape = [1] * x.ndim
            shape[self.axis] = x.shape[self.axis]
            x = x + self.shift[...].reshape(shape)
        return x if self.dtype is None else jnp.asarray(x, self.dtype)


def _replace_batchnorm(root: nnx.Module, path: Path, shift_in: str) -> None:
    raw = next(p for p, _ in nnx.iter_modules(root) if tuple(str(k) for k in p) == path)
    parent = root
    for key in raw[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    bn = parent[raw[-1]] if isinstance(raw[-1], int) else getattr(parent, raw[-1])
    shift = {arith.SHIFT_IN_BN_BIAS: lambda: bn.bias[...],
             arith.SHIFT_IN_BN_MEAN: lambda: -bn.mean[...]}.get(shift_in, lambda: None)()
    stand_in = FoldedBatchNorm(shift, bn.axis, bn.dtype)
    if isinstance(raw[-1], int):
        parent[raw[-1]] = stand_in
    else:
        setattr(parent, raw[-1], stand_in)


def bn_fold_nnx(module: nnx.Module, *example_args, return_report: bool = False,
                remove_batchnorms: bool = False, **example_kwargs) -> Any:
    """Folds every ``nnx.BatchNorm`` fed directly by an ``nnx.Conv``/``Linear`` (NNX path).

    Same rule and arithmetic as ``bn_fold``: the module is traced once (on a copy, in eval
    mode) on the example inputs, each BatchNorm whose input is exactly the output of an
    ``nnx.Conv``, ``nnx.ConvTranspose``, ``nnx.Linear`` or ``nnx.LinearGeneral`` (and used
    nowhere else) is folded into it and left as an exact identity plus shift.

    Args:
      module: the NNX module; it is not modified.
      *example_args: example inputs for ``module(...)``.
      return_report: also return a ``FoldReport``.
      remove_batchnorms: replace each folded BatchNorm by a ``FoldedBatchNorm`` that only
        adds its shift (or does nothing), so inference skips the BatchNorm computation.
        The module's state then no longer has those BatchNorms' variables.
      **example_kwargs: keyword arguments for ``module(...)``.

    Returns:
      A folded copy of ``module`` in eval mode (a folded BatchNorm is an identity only on its
      running statistics), or ``(folded, report)``.

    Raises:
      TypeError: if ``module`` is not an ``nnx.Module``.
      ValueError: naming the pair, for non-finite statistics or ``var + eps <= 0``.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> from flax import nnx
      >>> model = jol.app.NNXMLP(din=4, hidden=8, num_classes=3, rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> x = jnp.ones((2, 4))
      >>> folded = jol.bn_fold_nnx(model, x)
      >>> bool(jnp.allclose(folded(x), model(x), atol=1e-5))
      True
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be an nnx.Module, got {type(module).__name__}")
    pairs, skipped = _plan(module, example_args, example_kwargs)
    folded = nnx.clone(module)
    folded.eval()
    modules = _modules(folded)
    done = tuple(FoldedPair(path_name(p.layer), path_name(p.batch_norm), _fold_pair(modules, p))
                 for p in pairs)
    report = FoldReport(done, tuple(skipped))
    if remove_batchnorms:
        for pair in done:
            _replace_batchnorm(folded, tuple(pair.batch_norm.split("/")), pair.shift_in)
    warn_if_training(report)
    return (folded, report) if return_report else folded
