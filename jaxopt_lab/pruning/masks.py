"""Mask functions ``mask_fn(tree, sparsity, ...) -> mask tree`` (bool, True = keep).

Each returns a tree with the structure of ``tree``: selected leaves (``where``, default
float leaves with ``ndim >= 2``) get a bool mask of their shape, the others an all-True
mask. Counts are exact: with ``scope="layer"`` every selected leaf loses exactly
``floor(sparsity * size)`` entries, with ``scope="global"`` the selected leaves together
lose ``floor(sparsity * total)``; ties are broken by position. ``previous`` (a mask tree)
makes masks nested: entries it already prunes rank below every other, so along a rising
schedule a pruned weight never comes back. ``prune`` passes its current masks there.

A ``where`` callable may return ``{"sparsity": s}`` (``scope="layer"``) to give one leaf
its own target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab import _select
from jaxopt_lab.pruning import select
from jaxopt_lab.pruning.settings import SparsitySettings

Params = Any
# (path, leaf, previous leaf mask) -> the operands of ``select.SCORE_KINDS[kind]``
OperandsFn = Callable[[Any, Any, Any], tuple]


def check_sparsity(sparsity: Any, what: str = "sparsity") -> None:
    """Raises ``ValueError`` for a concrete sparsity outside ``[0, 1]`` (or NaN)."""
    if isinstance(sparsity, jax.core.Tracer) or sparsity is None:
        return
    value = np.asarray(sparsity)
    if value.shape != () or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{what} must be a scalar in [0, 1], got {sparsity!r}")


def previous_leaves(tree: Params, previous: Params | None) -> list[Any]:
    """The ``previous`` mask leaves aligned with ``tree``'s leaves (None when absent)."""
    n = len(jax.tree.leaves(tree))
    if previous is None:
        return [None] * n
    _select.check_same_structure(previous, tree, "previous mask", "params")
    leaves = jax.tree.leaves(previous)
    for (path, x), m in zip(jax.tree_util.tree_flatten_with_path(tree)[0], leaves):
        if np.shape(m) != np.shape(x):
            raise ValueError(
                f"{_select.path_str(path)}: previous mask shape {np.shape(m)} does not "
                f"match the leaf shape {np.shape(x)}"
            )
    return [jnp.asarray(m, bool) for m in leaves]


def all_true_like(leaf: Any) -> jax.Array:
    """An all-True mask of ``leaf``'s shape, sharded like ``leaf`` when it is on a mesh.

    A constant is replicated on every device, even under ``jax.jit`` with sharded inputs;
    computed from a float leaf by an elementwise op XLA cannot fold, it takes the leaf's
    sharding (one cheap pass over a leaf nothing else reads).
    """
    if select.on_mesh([leaf]) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        nan = jnp.isnan(leaf)
        return nan | ~nan
    return jnp.ones(np.shape(leaf), bool)


def ranked_mask(
    tree: Params,
    sparsity: Any,
    kind: str,
    operands_fn: OperandsFn,
    *,
    scope: str,
    where: Any,
    previous: Params | None,
    model_map: Any = None,
) -> Params:
    """Shared driver: prunes the lowest scores (``select.SCORE_KINDS[kind]`` applied to
    ``operands_fn(path, leaf, previous)``) per leaf or globally."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if sparsity is None:
        raise ValueError("sparsity is required (a number in [0, 1] or a schedule value)")
    base = SparsitySettings(sparsity=sparsity)  # its error names the bad value
    treedef = jax.tree.structure(tree)
    prev = previous_leaves(tree, previous)
    out: list[Any] = []
    pooled: list[tuple[int, jax.Array]] = []
    choices = _select.leaf_choices(tree, where, model_map=model_map)
    for i, (path, leaf, choice) in enumerate(choices):
        if choice is False:
            out.append(all_true_like(leaf))
            continue
        record = _select.leaf_overrides(path, choice, base)
        operands = operands_fn(path, leaf, prev[i])
        size = int(np.size(leaf))
        out.append(None)
        if scope == "global":
            if _select.overridden(choice, base, record):
                raise ValueError(
                    f"{_select.path_str(path)}: a per-leaf sparsity needs scope='layer'"
                )
            pooled.append((i, operands, size))
            continue
        out[i] = select.keep_lowest(kind, [operands],
                                    select.count_to_prune(record.sparsity, size))[0]
    if pooled:
        total = sum(n for _, _, n in pooled)
        keep = select.keep_lowest(
            kind, [ops for _, ops, _ in pooled], select.count_to_prune(sparsity, total)
        )
        for (i, _, _), m in zip(pooled, keep):
            out[i] = m
    return jax.tree.unflatten(treedef, out)


def magnitude_mask(
    tree: Params,
    sparsity: Any,
    *,
    scope: str = "layer",
    where: Any = None,
    previous: Params | None = None,
    model_map: Any = None,
) -> Params:
    """Keeps the largest-magnitude entries; prunes exactly ``floor(sparsity * size)``.

    Args:
      tree: a pytree of arrays (params).
      sparsity: fraction to prune, in ``[0, 1]`` (may be a traced scalar).
      scope: ``"layer"`` (each selected leaf on its own) or ``"global"`` (one
        ranking across all selected leaves).
      where: leaf selection (see ``jaxopt_lab._select``); a leaf may get its own
        `jaxopt_lab.SparsitySettings` (or ``{"sparsity": ..}``) with ``scope="layer"``.
      previous: a mask tree whose False entries are pruned first (nested masks).
      model_map: a `jaxopt_lab.ModelMap`: the default selection becomes the model's
        kernels (not embeddings, biases or norms, whatever their shape).

    Returns:
      A bool tree with ``tree``'s structure and leaf shapes (True = keep). NaN weights
      rank above every finite weight; ties are pruned in flat-index order.

    Raises:
      ValueError: sparsity outside ``[0, 1]``, an unknown scope, or a ``previous`` tree
        that does not match ``tree``.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> m = jol.magnitude_mask({"w": jnp.array([[1.0, -3.0], [0.5, 2.0]])}, 0.5)
      >>> m["w"].tolist()
      [[False, True], [False, True]]
    """
    return ranked_mask(
        tree,
        sparsity,
        "magnitude",
        lambda path, x, prev: (x, prev),
        scope=scope,
        where=where,
        previous=previous,
        model_map=model_map,
    )


def random_mask(
    tree: Params,
    sparsity: Any,
    *,
    key: jax.Array,
    scope: str = "layer",
    where: Any = None,
    previous: Params | None = None,
    model_map: Any = None,
) -> Params:
    """Prunes a uniformly random subset of exactly ``floor(sparsity * size)`` entries.

    With the same ``key`` masks are nested along a rising sparsity. Each leaf draws from
    ``jax.random.fold_in(key, leaf_index)``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> m = jol.random_mask({"w": jnp.ones((4, 4))}, 0.25, key=jax.random.PRNGKey(0))
      >>> int((~m["w"]).sum())
      4
    """
    if key is None:
        raise ValueError("random_mask needs a PRNG `key`")
    index = {path: i for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0])}

    def operands(path, x, prev):
        return (jax.random.fold_in(key, index[path]), x, prev)

    return ranked_mask(tree, sparsity, "random", operands, scope=scope, where=where,
                       previous=previous, model_map=model_map)


def saliency_mask(
    tree: Params,
    sparsity: Any,
    *,
    grads: Params,
    scope: str = "global",
    where: Any = None,
    previous: Params | None = None,
    model_map: Any = None,
) -> Params:
    """SNIP-style connection saliency: keeps the largest ``|w * g|``.

    Meant for one-shot pruning at initialisation (Lee et al. 2019) with ``grads`` the
    loss gradient on a batch; ``scope`` defaults to ``"global"`` as in SNIP.

    Raises:
      ValueError: ``grads`` does not match ``tree`` (structure or leaf shapes), or
        any error of :func:`magnitude_mask`.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> w = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
      >>> g = {"w": jnp.array([[4.0, 0.1], [1.0, 1.0]])}
      >>> jol.saliency_mask(w, 0.5, grads=g)["w"].tolist()
      [[True, False], [False, True]]
    """
    if grads is None:
        raise ValueError("saliency_mask needs `grads`, a gradient tree matching the params")
    _select.check_same_structure(grads, tree, "grads", "params")
    g_by_path = dict(jax.tree_util.tree_flatten_with_path(grads)[0])

    def operands(path, x, prev):
        g = g_by_path[path]
        if np.shape(g) != np.shape(x):
            raise ValueError(
                f"{_select.path_str(path)}: grads shape {np.shape(g)} != leaf shape {np.shape(x)}"
            )
        return (x, g, prev)

    return ranked_mask(tree, sparsity, "product", operands, scope=scope, where=where,
                       previous=previous, model_map=model_map)
