"""Finding the linen layers whose output goes straight into a BatchNorm, from the jaxpr.

The model call is traced once by the hook layer (`jaxopt_lab.core.flax_hooks`), with
nested calls inlined (`flax_hooks.flat_eqns`). A *layer* is a contraction (``dot_general``
or convolution) reading a ``kernel`` leaf, its output taken after the add of the same
module's ``bias`` leaf; a *BatchNorm* in inference mode is the op that subtracts a
``batch_stats/.../mean`` leaf from an activation, with its epsilon and the dtype it adds
``var + eps`` in read from the op that does so. A BatchNorm whose input is a layer's
output is a candidate; ``plan.py`` then checks that the BatchNorm is that output's only
reader and plans the fold. No module method is intercepted.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax
import flax.linen as nn
import jax.extend.core as jcore
import numpy as np

from jaxopt_lab.core import flax_hooks
from jaxopt_lab.core.mapping import path_names
from jaxopt_lab.fold.plan import (
    BNCall,
    Graph,
    LayerCall,
    Path,
    StoredShape,
    new_tag,
    plan_calls,
    shape_of,
)
from jaxopt_lab.fold.report import TRAINING_MODE, SkippedBatchNorm

LIFTED = ("it runs inside a lifted transform (nn.scan, nn.vmap, a loop), which bn_fold "
          "does not fold")


def _layer_calls(graph: Graph, names, leaf_at, shapes) -> dict[int, LayerCall]:
    out = {}
    for fe in graph.eqns:
        if fe.name not in ("dot_general", "conv_general_dilated"):
            continue
        k = graph.leaf(fe.ins[1])
        if k is None or graph.leaf(fe.ins[0]) is not None or names[k][0] != "params" \
                or names[k][-1] != "kernel":
            continue
        path = names[k][1:-1]
        out_rank = len(fe.eqn.outvars[0].aval.shape)
        kernel_rank = len(shapes[k])
        if fe.name == "dot_general":
            (_, rc), (_, rb) = fe.eqn.params["dimension_numbers"]
            n_free = len(graph.aval[fe.ins[1]].shape) - len(rc) - len(rb)
            feature_axes = tuple(range(out_rank - n_free, out_rank))
            features_last = True
        else:
            dn = fe.eqn.params["dimension_numbers"]
            feature_axes = (dn.out_spec[1],)
            axes = graph.axes_of.get(fe.ins[1])
            features_last = axes is None or axes[dn.rhs_spec[0]] == kernel_rank - 1
        y = fe.outs[0]
        bias = leaf_at.get(("params", path, "bias"))
        readers = graph.readers[y]
        if bias is not None and len(readers) == 1 and readers[0][0].name == "add" and any(
                graph.leaf(v) == bias for v in readers[0][0].ins):
            y = readers[0][0].outs[0]
        out[y] = LayerCall(path=path, out=None, tag=new_tag(), feature_axes=feature_axes,
                           kernel_shape=shapes[k],
                           bias_shape=None if bias is None else shapes[bias],
                           kernel_features_last=features_last)
    return out


def _epsilon(graph: Graph, var: int):
    """``(epsilon, dtype)`` of the op adding a literal to a view of the ``var`` leaf."""
    for v, leaf in graph.view_of.items():
        if leaf != var:
            continue
        for fe, _ in graph.readers[v]:
            lit = [x for x in fe.ins if isinstance(x, jcore.Literal)]
            if fe.name == "add" and lit:
                return float(np.asarray(lit[0].val)), np.dtype(fe.eqn.outvars[0].aval.dtype)
    return None


def _bn_calls(graph: Graph, names, leaf_at, layers):
    means = {i: n[1:-1] for i, n in enumerate(names)
             if n[0] == "batch_stats" and n[-1] == "mean"}
    bns, seen = [], set()
    for fe in graph.eqns:
        mean = graph.leaf(fe.ins[1]) if fe.name == "sub" else None
        if mean not in means or graph.leaf(fe.ins[0]) is not None:
            continue
        path = means[mean]
        var = leaf_at.get(("batch_stats", path, "var"))
        eps = None if var is None else _epsilon(graph, var)
        if eps is None:
            continue
        seen.add(path)
        x, m = graph.aval[fe.ins[0]].shape, graph.aval[fe.ins[1]].shape
        axes = tuple(d for d in range(len(x)) if m[d] == x[d] and x[d] != 1) or (len(x) - 1,)
        layer = layers.get(fe.ins[0])
        bns.append((fe, BNCall(
            path=path, layer=layer, tag=new_tag() if layer is not None else None,
            eval_mode=True, axes=axes, in_shape=tuple(x), epsilon=eps[0], stat_dtype=eps[1],
            stat_shape=tuple(x[a] for a in axes),
            use_scale=("params", path, "scale") in leaf_at,
            use_bias=("params", path, "bias") in leaf_at)))
    skipped = []
    for leaf, path in means.items():
        if path in seen:
            continue
        readers = [fe for v, lf in graph.view_of.items() if lf == leaf
                   for fe, _ in graph.readers[v]]
        if readers:
            lifted = any(fe.name not in ("mul", "add", "sub", "div") for fe in readers)
            reason = LIFTED if lifted else (f"{TRAINING_MODE} (batch statistics) in this "
                                            "trace; pass the eval arguments, e.g. train=False")
            skipped.append(SkippedBatchNorm("/".join(path), None, reason))
    return bns, skipped


def _check_nothing_created(program, variables) -> None:
    """A variable the call had to create (``mutable=True`` lets Flax initialise a missing
    ``batch_stats``) means the variables given were incomplete: say so."""
    import jax
    out = jax.tree.unflatten(program.out_treedef, [0] * program.out_treedef.num_leaves)
    state = out[1] if isinstance(out, tuple) and len(out) == 2 else {}
    given = {path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
    for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = path_names(p)
        if names not in given:
            raise ValueError(f"{'/'.join(names[1:-1])} has no {names[0]}['{names[-1]}'] in "
                             "the variables; pass the full variables, not only 'params'")


def _trace(model: nn.Module, variables, args, kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k != "mutable"}
    try:
        program = flax_hooks.trace(model, variables, *args, mutable=True, **kwargs)
    except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeVariableNotFound) as e:
        # e.g. only 'params' given: say what is missing rather than fail inside Flax
        raise ValueError(f"the variables lack what the model reads ({e}); pass the full "
                         "variables (params and batch_stats), not only 'params'") from None
    _check_nothing_created(program, variables)
    graph = Graph(program)
    names = [path_names(p) for p in program.paths]
    shapes = [tuple(np.shape(x)) for x in program.leaves]
    leaf_at = {(n[0], n[1:-1], n[-1]): i for i, n in enumerate(names)}
    layers = _layer_calls(graph, names, leaf_at, shapes)
    bns, skipped = _bn_calls(graph, names, leaf_at, layers)
    tag_of = {(id(fe), 0): bn.tag for fe, bn in bns}
    uses = {}
    for y, layer in layers.items():
        readers = [tag_of.get((id(fe), pos), "?") for fe, pos in graph.readers[y]]
        uses[layer.tag] = (None, readers + (["<output>"] if y in graph.outputs else []))
    return list(layers.values()), [bn for _, bn in bns], uses, skipped


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
    layers, bns, uses, skipped = _trace(model, variables, args, kwargs)
    pairs, planned_skips = plan_calls(layers, bns, uses, linen_stored_shape(variables))
    return pairs, planned_skips + skipped
