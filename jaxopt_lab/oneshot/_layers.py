"""Kernels as ``(K, N)`` matrices and the per-leaf driver of the tree-level methods
(private).

A kernel's contracting axes (the inputs it sums over) are flattened, in order, into ``K``
and the remaining axes into ``N``. Which axes contract comes from a ``contracting`` mapping
``{leaf path: axes}``, else from the model map (``model_map=``), else the shape rule of a
Flax ``Dense``/``Conv`` kernel: every axis but the last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab import _select
from jaxopt_lab.core.mapping import path_names
from jaxopt_lab.oneshot.stats import check_stats

Params = Any
Contracting = Mapping[str, tuple[int, ...]] | None


def contracting_axes(name: str, shape: tuple[int, ...], contracting: Contracting,
                     model_map: Any = None, path: tuple = ()) -> tuple[int, ...]:
    """The leaf's contracting axes (non-negative, sorted as given), checked: from the
    ``contracting`` mapping, else the model map, else every axis but the last."""
    nd = len(shape)
    axes = (contracting or {}).get(name)
    if axes is None and model_map is not None:
        info = model_map.lookup(path)
        if info is not None and info.contracting:
            axes = info.contracting
    if axes is None:
        axes = tuple(range(nd - 1))
    axes = tuple(int(a) % nd if -nd <= int(a) < nd else None for a in axes)
    if not axes or None in axes or len(set(axes)) != len(axes) or len(axes) >= nd:
        raise ValueError(f"{name}: bad contracting axes {axes} for a kernel of shape {shape}")
    return axes


def as_matrix(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` with ``axes`` moved to the front (in order) and flattened to ``(K, N)``."""
    rest = tuple(i for i in range(x.ndim) if i not in axes)
    k = int(np.prod([x.shape[a] for a in axes]))
    return jnp.transpose(x, axes + rest).reshape(k, -1)


def from_matrix(mat: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """Inverse of `as_matrix` for a kernel of ``shape``."""
    rest = tuple(i for i in range(len(shape)) if i not in axes)
    order = axes + rest
    moved = mat.reshape(tuple(shape[a] for a in order))
    return jnp.transpose(moved, tuple(int(i) for i in np.argsort(order)))


def as_rows(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` as ``(K, *outputs)``: `as_matrix` without flattening the output axes.

    On a sharded kernel, merging output axes where one that is not the first is split
    (``(H, hd)`` sharded along ``hd`` into ``H * hd``) makes XLA gather the whole leaf;
    kept apart, every per-column computation runs where the column lives.
    """
    rest = tuple(i for i in range(x.ndim) if i not in axes)
    k = int(np.prod([x.shape[a] for a in axes]))
    return jnp.transpose(x, axes + rest).reshape((k,) + tuple(x.shape[i] for i in rest))


def from_rows(x: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """Inverse of `as_rows` for a kernel of ``shape``."""
    return from_matrix(x, shape, axes)


def stats_leaf(stats: Any, path: tuple, name: str) -> Any:
    """The statistics of the leaf at ``path``: ``stats`` is keyed by leaf path string or is
    a tree with the params' structure (a prefix holding `LayerStats` records)."""
    if isinstance(stats, Mapping) and name in stats:
        return stats[name]
    if isinstance(stats, Mapping) and stats and all(isinstance(k, tuple) for k in stats):
        # {leaf names: stats} from `calibration_stats`: names from the model's root, so
        # the leaf's path (relative to a subtree) must end exactly one of them.
        names = path_names(path)
        found = [k for k in stats if k[len(k) - len(names):] == names]
        return stats[found[0]] if len(found) == 1 else None
    node = stats
    for key in path:
        k = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return None
        if hasattr(node, "xtx"):
            return node
    return node if hasattr(node, "xtx") else None


def map_kernels(fn: Callable[[str, tuple, jax.Array, Any], Any], params: Params,
                where: _select.Where, model_map: Any = None) -> Params:
    """Applies ``fn(name, path, leaf, choice)`` to the selected leaves (default: the map's
    kernels, else float leaves with ``ndim >= 2``)."""
    return _select.map_selected(
        lambda p, x, c: fn(_select.path_str(p), p, x, c), params, where, model_map=model_map)


def kernel_matrix(name: str, path: tuple, leaf: Any, stats: Any, contracting: Contracting,
                  model_map: Any) -> tuple[tuple[int, ...], tuple[int, ...], jax.Array, Any]:
    """``(shape, contracting axes, W as (K, N), the leaf's LayerStats)``, all checked."""
    check_weights(name, leaf)
    shape = tuple(np.shape(leaf))
    axes = contracting_axes(name, shape, contracting, model_map, path)
    mat = as_matrix(jnp.asarray(leaf), axes)
    st = stats_leaf(stats, path, name)
    check_stats(name, st, mat.shape[0])
    return shape, axes, mat, st


def check_weights(name: str, w) -> None:
    if not _select.is_float_array(w) or np.ndim(w) < 2:
        raise ValueError(f"{name}: expected a float kernel with ndim >= 2, got "
                         f"{getattr(w, 'dtype', type(w))} of shape {np.shape(w)}")
    if not isinstance(w, jax.core.Tracer) and not bool(np.isfinite(np.asarray(w)).all()):
        raise ValueError(f"{name}: the kernel holds NaN or Inf")
