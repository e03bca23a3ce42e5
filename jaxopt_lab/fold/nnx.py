"""``bn_fold_nnx``: batch-norm folding for Flax NNX modules.

The pairs are read from the jaxpr of one call of an eval-mode copy, traced by the hook
layer (`jaxopt_lab.core.flax_hooks`): which Conv/Linear kernel produced a value, and which
BatchNorm subtracts its running mean from it, are ops in that jaxpr, so no layer class is
wrapped or patched. Planning and arithmetic are the linen path's. The input module is
never modified: a folded copy is returned.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_lab.core import flax_hooks
from jaxopt_lab.core.mapping import path_names
from jaxopt_lab.fold import arith
from jaxopt_lab.fold.plan import (
    BNCall,
    Graph,
    LayerCall,
    PairPlan,
    Path,
    new_tag,
    path_name,
    plan_calls,
)
from jaxopt_lab.fold.report import (
    TRAINING_MODE,
    FoldedPair,
    FoldReport,
    SkippedBatchNorm,
    warn_if_training,
)

LAYER_TYPES = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral)


def _variable_shape(v) -> tuple[int, ...] | None:
    return None if v is None else tuple(np.shape(v[...]))


def _layer_calls(graph: Graph, leaf_at, names, modules):
    """One `LayerCall` per Conv/Linear contraction, keyed by its output value (after
    the layer's own bias add)."""
    out = {}
    for fe in graph.eqns:
        if fe.name not in ("dot_general", "conv_general_dilated"):
            continue
        kernel = next((graph.leaf(v) for v in fe.ins if graph.leaf(v) is not None), None)
        if kernel is None or names[kernel][-1] != "kernel":
            continue
        path = names[kernel][:-1]
        module = modules.get(path)
        if not isinstance(module, LAYER_TYPES):
            continue
        y = fe.outs[0]
        bias = leaf_at.get((path, "bias"))
        readers = graph.readers[y]
        if bias is not None and len(readers) == 1 and readers[0][0].name == "add" and any(
                graph.leaf(v) == bias for v in readers[0][0].ins):
            y = readers[0][0].outs[0]
        rank = len(graph.aval[y].shape)
        k = len(module.out_features) if isinstance(module, nnx.LinearGeneral) else 1
        out[y] = LayerCall(
            path=path, out=None, tag=new_tag(), feature_axes=tuple(range(rank - k, rank)),
            kernel_shape=_variable_shape(module.kernel), bias_shape=_variable_shape(module.bias),
            kernel_features_last=not (isinstance(module, nnx.ConvTranspose)
                                      and module.transpose_kernel))
    return out


def _bn_call(module, path, x_aval, layer) -> BNCall:
    # NNX promotes x and every statistic to one dtype before computing var + eps.
    present = [v[...].dtype for v in (module.mean, module.var, module.scale, module.bias)
               if v is not None]
    stat_dtype = np.dtype(module.dtype or jnp.result_type(x_aval.dtype, *present))
    ndim = len(x_aval.shape)
    axes = tuple(sorted(a % ndim for a in (module.axis if isinstance(module.axis, tuple)
                                           else (module.axis,))))
    return BNCall(
        path=path, layer=layer, tag=new_tag() if layer is not None else None, eval_mode=True,
        axes=axes, in_shape=tuple(x_aval.shape), epsilon=float(module.epsilon),
        stat_dtype=stat_dtype, stat_shape=tuple(x_aval.shape[a] for a in axes),
        use_scale=module.scale is not None, use_bias=module.bias is not None)


def _modules(module: nnx.Module) -> dict[Path, nnx.Module]:
    return {tuple(str(k) for k in p): m for p, m in nnx.iter_modules(module)}


def _plan(module: nnx.Module, args, kwargs):
    """Finds the pairs in the jaxpr of one call of an eval-mode copy (the hook layer's
    trace): a BatchNorm folds into a Conv/Linear when it subtracts its running mean from
    exactly that layer's output (bias included) and nothing else reads that output."""
    copy = nnx.clone(module)
    copy.eval()
    program = flax_hooks.trace(copy, None, *args, **kwargs)
    graph = Graph(program)
    names = [path_names(p) for p in program.paths]
    leaf_at = {(n[:-1], n[-1]): i for i, n in enumerate(names)}
    modules = _modules(copy)
    layers = _layer_calls(graph, leaf_at, names, modules)
    means = {leaf_at[(p, "mean")]: p for p, m in modules.items()
             if isinstance(m, nnx.BatchNorm) and (p, "mean") in leaf_at}
    bns, bn_of_read, seen = [], {}, set()
    for fe in graph.eqns:
        mean = graph.leaf(fe.ins[1]) if fe.name == "sub" else None
        if mean not in means or graph.leaf(fe.ins[0]) is not None:
            continue
        path = means[mean]
        seen.add(path)
        call = _bn_call(modules[path], path, graph.aval[fe.ins[0]], layers.get(fe.ins[0]))
        bns.append(call)
        bn_of_read[(id(fe), 0)] = call.tag
    uses = {}
    for y, layer in layers.items():
        readers = [bn_of_read.get((id(fe), pos), "?") for fe, pos in graph.readers[y]]
        uses[layer.tag] = (None, readers + (["<output>"] if y in graph.outputs else []))
    training = [SkippedBatchNorm(path_name(p), None, f"{TRAINING_MODE} (batch statistics) in "
                                 "this trace; pass the eval arguments")
                for leaf, p in means.items() if p not in seen and graph.readers[leaf]]

    original = _modules(module)

    def stored_shape(collection: str, path: Path, name: str):
        del collection
        return _variable_shape(getattr(original.get(path), name, None))

    pairs, skipped = plan_calls(list(layers.values()), bns, uses, stored_shape)
    return pairs, skipped + training


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
