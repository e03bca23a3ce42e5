"""``prune``: an optax transformation that keeps pruned weights exactly zero.

Chained after any optimizer it rewrites the update of a pruned weight ``p`` to ``-p``,
so ``optax.apply_updates`` lands on exactly ``0.0`` (``p + (-p)`` is exact in floating
point); kept weights get the optimizer's update unchanged. Masks live in the state and
are recomputed, under ``lax.cond``, only on steps where the schedule's sparsity changes,
from the weights entering that step, nested on the current masks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxopt_lab import _select
from jaxopt_lab.pruning.masks import all_true_like
from jaxopt_lab.pruning.schedules import constant_sparsity

Params = Any
MaskFn = Callable[..., Params]


class PruneState(NamedTuple):
    """State of :func:`prune`.

    Attributes:
      count: updates applied so far (int32).
      sparsity: the schedule value the current masks were computed for (float32; NaN
        before the first update).
      masks: bool tree with the params' structure and shapes, True = keep.
    """

    count: jax.Array
    sparsity: jax.Array
    masks: Params


def _accepted(fn: Callable) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_masks(params: Params, masks: Params) -> Params:
    """Validates a mask tree against ``params``; returns it as bool arrays of leaf shape.

    Raises:
      ValueError: different structure, or a mask leaf that does not broadcast to its leaf.
    """
    _select.check_same_structure(masks, params, "mask", "params")
    out = []
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), m in zip(flat, jax.tree.leaves(masks)):
        try:
            shape = np.broadcast_shapes(np.shape(m), np.shape(p))
        except ValueError:
            shape = None
        if shape != np.shape(p):
            raise ValueError(
                f"{_select.path_str(path)}: mask shape {np.shape(m)} does not fit the leaf "
                f"shape {np.shape(p)}"
            )
        out.append(jnp.broadcast_to(jnp.asarray(m, bool), np.shape(p)))
    return jax.tree.unflatten(jax.tree.structure(params), out)


def prune(
    mask_fn: MaskFn | Params,
    schedule: Callable[[jax.Array], jax.Array] | float | None = None,
    *,
    where: Any = None,
    axis_name: str | None = None,
    model_map: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Pruning as an optax transformation; chain it after the optimizer.

    After every ``optax.apply_updates(params, updates)`` the pruned weights are exactly
    zero, and they stay zero on later steps, with no extra call.

    Args:
      mask_fn: ``mask_fn(tree, sparsity, ...) -> mask tree`` (e.g. ``magnitude_mask``,
        ``functools.partial(nm_mask, n=2, m=4)``), or a fixed mask tree. Keyword
        parameters it declares are filled in when masks are recomputed: ``previous``
        (the current masks, so magnitude masks nest), ``where`` (when given here), and
        any optax extra argument of the same name, e.g. ``grads=`` for
        ``saliency_mask`` or ``key=`` for ``random_mask`` passed to ``tx.update``.
      schedule: ``step -> sparsity`` (e.g. ``polynomial_sparsity``), a constant number,
        or None: the mask is computed once, at the first update, with sparsity None.
      where: leaf selection passed to ``mask_fn``; leaves outside it are never masked.
      axis_name: the ``pmap`` axis, if any: masks are then computed from the replicas'
        mean weights so every replica holds the same mask even if they drifted.
      model_map: a `jaxopt_lab.ModelMap`, passed to ``mask_fn`` (N:M along the real
        contraction, the model's kernels as the default selection).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`PruneState`.
      Its ``update`` needs ``params``.

    Raises:
      ValueError: ``params`` missing in ``update``; a mask tree that does not match the
        params; schedule errors from the schedule constructors.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxopt_lab as jol
      >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 8))}
      >>> tx = optax.chain(optax.adam(1e-2), jol.prune(jol.magnitude_mask, 0.75))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> int((params["w"] == 0).sum())
      48
    """
    fixed = None if callable(mask_fn) else mask_fn
    if schedule is None:
        target_fn = lambda count: jnp.float32(0.0)  # noqa: E731  (recompute only at step 0)
    elif callable(schedule):
        target_fn = schedule
    else:
        target_fn = constant_sparsity(schedule)
    accepted = set() if fixed is not None else _accepted(mask_fn)

    def compute(tree, sparsity, masks, extra):
        if fixed is not None:
            new = fixed
        else:
            kwargs = {k: v for k, v in extra.items() if k in accepted}
            if "previous" in accepted:
                kwargs["previous"] = masks
            if where is not None and "where" in accepted:
                kwargs["where"] = where
            if model_map is not None and "model_map" in accepted:
                kwargs["model_map"] = model_map
            new = mask_fn(tree, None if schedule is None else sparsity, **kwargs)
        new = check_masks(tree, new)
        if where is not None or model_map is not None:  # leaves outside are never masked
            picks = _select.selection(tree, where, model_map=model_map)
            new = jax.tree.map(lambda m, on, p: m if on else all_true_like(p),
                               new, picks, tree)
        return new

    def init_fn(params):
        # Sharded like each parameter: a constant would put every whole mask on one device.
        masks = jax.tree.map(all_true_like, params)
        return PruneState(jnp.zeros((), jnp.int32), jnp.full((), jnp.nan, jnp.float32), masks)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("prune needs `params` in update(updates, state, params)")
        _select.check_same_structure(updates, params, "updates", "params")
        if _is_concrete((updates, state, params, extra_args)):
            # Called eagerly (a notebook, a plain Python loop): op-by-op dispatch would
            # trace both ``lax.cond`` branches and run every mask op separately on every
            # call (seconds on a 56K-parameter model); one compiled program per input
            # signature, cached on this transformation, takes milliseconds after the first.
            return jitted_update(updates, state, params, **extra_args)
        return traced_update(updates, state, params, **extra_args)

    def traced_update(updates, state, params, **extra_args):
        target = jnp.asarray(target_fn(state.count), jnp.float32)
        changed = (state.count == 0) if schedule is None else (target != state.sparsity)

        def recompute():
            # From the weights entering this step: masking from ``params + updates``
            # would keep the optimizer's update from fusing with the masking (~3x slower
            # ordinary steps on CPU), and ``params`` already carry the current masks.
            tree = params
            if axis_name is not None:
                tree = lax.pmean(tree, axis_name)
            return compute(tree, target, state.masks, extra_args)

        masks = lax.cond(changed, recompute, lambda: state.masks)
        sparsity = jnp.where(changed, target, state.sparsity)

        def masked(u, p, m):
            dtype = jnp.promote_types(u.dtype, p.dtype)  # so -p is exact
            return jnp.where(m, u.astype(dtype), -p.astype(dtype))

        updates = jax.tree.map(masked, updates, params, masks)
        return updates, PruneState(state.count + 1, sparsity, masks)

    jitted_update = jax.jit(traced_update)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_concrete(tree: Any) -> bool:
    """True if every leaf is a concrete array (nothing is being traced).

    Anything else (a tracer, or a Python value in an extra argument, which ``jit`` would
    turn into a tracer where a mask function may expect a constant) keeps the call on the
    ordinary path.
    """
    return all(
        isinstance(x, (np.ndarray, np.generic))
        or (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))
        for x in jax.tree.leaves(tree)
    )


def apply_mask(tree: Params, mask: Params) -> Params:
    """Zeroes the entries of ``tree`` where ``mask`` is False (same structure; bool leaves
    of the leaf's shape, or broadcastable to it).

    Raises:
      ValueError: the mask tree does not match ``tree``.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> jol.apply_mask({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})["w"]
      Array([1., 0.], dtype=float32)
    """
    masks = check_masks(tree, mask)
    return jax.tree.map(
        lambda x, m: jnp.where(m, x, jnp.zeros((), jnp.asarray(x).dtype)), tree, masks
    )


class Sparsity(NamedTuple):
    """What :func:`sparsity` reports.

    Attributes:
      per_leaf: tree of per-leaf fractions of zeros (every leaf).
      nonzero: tree of per-leaf nonzero counts (every leaf).
      overall: fraction of zeros over the selected leaves together.
      overall_nonzero: nonzero count over the selected leaves.
      size: number of entries in the selected leaves.
    """

    per_leaf: Params
    nonzero: Params
    overall: jax.Array
    overall_nonzero: jax.Array
    size: int


def sparsity(tree: Params, *, where: Any = None) -> Sparsity:
    """Fractions of exact zeros, per leaf and over the ``where``-selected leaves.

    ``where`` defaults to float or bool leaves with ``ndim >= 2``; a bool tree (a mask)
    counts False as zero. Only ``+0`` and ``-0`` are zeros: subnormals count as nonzero
    (by their bits) though XLA flushes them to zero in arithmetic. Works under ``jit``.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> s = jol.sparsity({"w": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "b": jnp.ones(2)})
      >>> float(s.overall), float(s.per_leaf["b"]), int(s.nonzero["w"])
      (0.75, 0.0, 1)
    """
    if where is None:  # kernels, as for every technique; masks (bool) count too
        where = lambda p, x: np.ndim(x) >= 2 and (  # noqa: E731
            _select.is_float_array(x) or np.dtype(getattr(x, "dtype", None)) == bool
        )

    def is_nonzero(x):
        # By bits, not ``x != 0``: XLA flushes subnormals, so a float compare calls them 0.
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            return is_nonzero(jnp.real(x)) | is_nonzero(jnp.imag(x))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x != 0
        width = jnp.finfo(x.dtype).bits
        if width not in (8, 16, 32, 64):  # float4 and the like: no unsigned twin to view as
            return x != 0
        uint = np.dtype(f"uint{width}")
        signed_zeros = np.array([0.0, -0.0], x.dtype)  # fnuz types have no -0, e8m0 no 0
        bits, out = lax.bitcast_convert_type(x, uint), jnp.ones(x.shape, bool)
        for pattern in set(signed_zeros.view(uint)[signed_zeros == 0].tolist()):
            out = out & (bits != uint.type(pattern))
        return out

    def nonzero(x):
        return jnp.sum(is_nonzero(jnp.asarray(x)), dtype=jnp.int32)

    counts = jax.tree.map(nonzero, tree)
    per_leaf = jax.tree.map(
        lambda x, c: 1.0 - c / max(np.size(x), 1) if np.size(x) else jnp.float32(0.0),
        tree, counts,
    )
    choices = _select.leaf_choices(tree, where)
    picked = [(x, c) for (_, x, ch), c in zip(choices, jax.tree.leaves(counts)) if ch is not False]
    size = int(sum(np.size(x) for x, _ in picked))
    nz = sum((c for _, c in picked), jnp.int32(0))
    overall = 1.0 - nz / size if size else jnp.float32(0.0)
    return Sparsity(per_leaf, counts, jnp.asarray(overall, jnp.float32), nz, size)
