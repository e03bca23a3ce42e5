"""Structured mask functions: N:M groups and whole output channels.

Both follow the ``mask_fn(tree, sparsity, ...) -> mask tree`` protocol of
:mod:`jaxopt_lab.pruning.masks` (True = keep, all-True for unselected leaves, ``previous``
for nested masks) and select leaves with ``where``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab import _select
from jaxopt_lab.pruning import select
from jaxopt_lab.pruning.masks import check_sparsity, previous_leaves
from jaxopt_lab.pruning.settings import NMSettings, SparsitySettings

Params = Any


def _group_keep(scores: jax.Array, keep_per_group: jax.Array) -> jax.Array:
    """Within the last axis (size M), keeps the ``keep_per_group`` highest scores.

    Rank of entry i = number of entries that beat it (higher score, or equal score at
    a lower index); M is small so the pairwise comparison is cheaper than a sort.
    """
    m = scores.shape[-1]
    a = scores[..., :, None]
    b = scores[..., None, :]
    lower_index = np.arange(m)[None, :] < np.arange(m)[:, None]  # [i, j]: j < i
    lower_index = lower_index.reshape((1,) * (scores.ndim - 1) + (m, m))
    beats = (b > a) | ((b == a) & lower_index)
    rank = beats.sum(axis=-1)
    return rank < keep_per_group


def _contraction(info: Any, shape: tuple[int, ...], axis: int, explicit: bool
                 ) -> tuple[int, ...]:
    """The leaf axes N:M groups run along: the map's contraction, else ``axis``."""
    if not explicit and info is not None and info.role in ("kernel", "embedding") \
            and info.contracting:
        return tuple(info.contracting)
    return (axis % len(shape),)


def _to_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` with ``axes`` moved last (in order) and flattened into one."""
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = jnp.transpose(x, rest + list(axes))
    return moved.reshape(moved.shape[:len(rest)] + (-1,) if moved.size else
                         moved.shape[:len(rest)] + (math.prod(x.shape[a] for a in axes),))


def _from_last(y: jax.Array, axes: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `_to_last` for an array of the original ``shape``."""
    rest = [a for a in range(len(shape)) if a not in axes]
    moved = y.reshape(tuple(shape[a] for a in rest) + tuple(shape[a] for a in axes))
    return jnp.transpose(moved, np.argsort(rest + list(axes)))


def nm_mask(
    tree: Params,
    sparsity: Any = None,
    *,
    n: int = 2,
    m: int = 4,
    axis: int = -2,
    where: Any = None,
    previous: Params | None = None,
    model_map: Any = None,
) -> Params:
    """N:M structured sparsity: every group of ``m`` consecutive entries along the
    contraction keeps at most ``n`` (the largest magnitudes; ties by index).

    The contraction is what sparse tensor cores group (2:4). With a ``model_map`` it is
    read from the model: all of a kernel's contracting axes, flattened in order (``kh x kw
    x in`` of a conv, ``heads x head_dim`` of an attention output kernel; never the heads
    of a query kernel). Without one, the shape rule: ``axis`` (-2, the input axis of a
    Flax ``(in, out)`` Dense and of an HWIO conv kernel).

    Args:
      tree: a pytree of arrays.
      sparsity: ``None`` for the full N:M pattern. A number (e.g. from a schedule) ramps
        to it: each group prunes ``min(m - n, floor(sparsity * m))`` entries, so a
        schedule rising to ``1 - n/m`` reaches N:M through nested steps (1:4 pruned at
        25%, 2:4 at 50%). A NaN traced under ``jit`` prunes every entry.
      n: entries kept per group. m: group size.
      axis: the grouped axis without a map (or as a per-leaf override).
      where: leaf selection (default: the map's kernels, else float leaves with
        ``ndim >= 2``). A callable or mask may give a leaf its own
        `jaxopt_lab.NMSettings` or a mapping of some of its fields
        (``{"n": .., "m": .., "axis": ..}``); a field it sets (a record's field that
        differs from the call's) wins over the map and never falls back.
      previous: a mask tree whose False entries are pruned first.
      model_map: a `jaxopt_lab.ModelMap` of the model.

    Returns:
      The mask tree. A selected leaf whose contraction length ``m`` does not divide (a
      first conv with one input channel) is left unpruned and named in one
      `jaxopt_lab.LayoutFallbackWarning`.

    Raises:
      ValueError: ``n > m``, ``m < 1``, sparsity outside ``[0, 1]``, an axis out of range,
        or a per-leaf override whose axis length is not divisible by ``m``.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> w = jnp.array([[1.0], [-4.0], [3.0], [0.5]])
      >>> jol.nm_mask({"w": w}, n=2, m=4)["w"][:, 0].tolist()
      [False, True, True, False]
    """
    base = _select.settings("nm_mask", NMSettings, n=n, m=m, axis=axis)
    check_sparsity(sparsity)
    prev = previous_leaves(tree, previous)
    out, fallbacks = [], []
    choices = _select.leaf_choices(tree, where, model_map=model_map)
    for i, (path, leaf, choice) in enumerate(choices):
        shape = np.shape(leaf)
        if choice is False:
            out.append(jnp.ones(shape, bool))
            continue
        name = _select.path_str(path)
        record = _select.leaf_overrides(path, choice, base)
        explicit = _select.overridden(choice, base, record)
        ln, lm, lax_ = record.n, record.m, record.axis
        if not -len(shape) <= lax_ < len(shape):
            raise ValueError(f"{name}: axis {lax_} is out of range for shape {shape}")
        info = None if model_map is None else model_map.lookup(path)
        axes = _contraction(info, shape, lax_, "axis" in explicit)
        length = math.prod(shape[a] for a in axes)
        if length % lm:
            why = f"contraction axes {axes} have length {length}, not divisible by m={lm}"
            if "axis" in explicit or "m" in explicit:
                raise ValueError(f"{name}: {why}")
            fallbacks.append(f"{name}: {why}; left unpruned")
            out.append(jnp.ones(shape, bool))
            continue
        prune = lm - ln
        if sparsity is not None:
            prune = jnp.minimum(lm - ln, select.count_to_prune(sparsity, lm))
            # A traced NaN prunes every entry, as in the other mask functions, rather
            # than quietly falling back to the full N:M pattern.
            if not isinstance(sparsity, (int, float)):
                prune = jnp.where(jnp.isnan(jnp.asarray(sparsity, jnp.float32)), lm, prune)
        scores = _to_last(select.magnitude_scores(leaf, prev[i]), axes)
        moved = scores.shape
        grouped = scores.reshape(*moved[:-1], moved[-1] // lm, lm)
        keep = _group_keep(grouped, lm - prune).reshape(moved)
        out.append(_from_last(keep, axes, shape))
    _select.report_fallbacks(fallbacks, "nm_mask")
    return jax.tree.unflatten(jax.tree.structure(tree), out)


def channel_norms(x: jax.Array, axis: int, norm: str) -> jax.Array:
    """L1 or L2 norm of each index of ``axis`` over all other axes, in float32."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
    x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: zero channels are valid
    if norm == "l1":
        return jnp.abs(x).sum(axis=0)
    return jnp.sqrt(jnp.square(x).sum(axis=0))


def channel_mask(
    tree: Params,
    sparsity: Any,
    *,
    norm: str = "l2",
    axis: int = -1,
    where: Any = None,
    previous: Params | None = None,
    model_map: Any = None,
) -> Params:
    """Prunes whole output channels (filters) with the smallest L1/L2 norm.

    Each selected leaf loses exactly ``floor(sparsity * C)`` of its ``C`` channels: with
    a ``model_map`` the channels are the kernel's real output units (every element of
    its output axes, e.g. ``heads x head_dim`` of an attention query kernel); without
    one, the indices of ``axis`` (-1: the output features of a Flax Dense or Conv
    kernel). The mask has the
    leaf's shape, constant along every other axis. A channel that ``previous`` prunes
    anywhere ranks lowest. See :func:`jaxopt_lab.compact` to remove the channels. An empty
    leaf (no channels, or channels of no entries) gets an empty all-True mask, as in
    :func:`jaxopt_lab.magnitude_mask`.

    Raises:
      ValueError: sparsity outside ``[0, 1]``, unknown ``norm``, ``axis`` out of range.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> w = jnp.array([[1.0, 0.1, 2.0], [1.0, 0.1, -2.0]])
      >>> jol.channel_mask({"w": w}, 1 / 3)["w"].tolist()
      [[True, False, True], [True, False, True]]
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if sparsity is None:
        raise ValueError("sparsity is required (a number in [0, 1] or a schedule value)")
    base = SparsitySettings(sparsity=sparsity)  # its error names the bad value
    prev = previous_leaves(tree, previous)
    out = []
    for i, (path, leaf, choice) in enumerate(
            _select.leaf_choices(tree, where, model_map=model_map)):
        shape = np.shape(leaf)
        if choice is False:
            out.append(jnp.ones(shape, bool))
            continue
        name = _select.path_str(path)
        s = _select.leaf_overrides(path, choice, base).sparsity
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"{name}: axis {axis} is out of range for shape {shape}")
        info = None if model_map is None else model_map.lookup(path)
        axes = (info.channel_axes if info is not None and info.role == "kernel"
                and info.channel_axes else (axis % len(shape),))
        channels = math.prod(shape[a] for a in axes)
        alive = None
        if prev[i] is not None:
            alive = _to_last(jnp.asarray(prev[i]), axes).reshape(-1, channels).all(axis=0) \
                if prev[i].size else jnp.ones((channels,), bool)
        scores = _to_last(jnp.asarray(leaf, jnp.float32), axes)
        norms = channel_norms(scores.reshape(-1, channels) if scores.size else
                              jnp.zeros((0, channels)), -1, norm)
        keep = select.keep_lowest(
            "magnitude", [(norms, alive)], select.count_to_prune(s, channels)
        )[0]
        rest = tuple(shape[a] for a in range(len(shape)) if a not in axes)
        full = jnp.broadcast_to(keep, rest + (channels,))
        out.append(_from_last(full, axes, shape))
    return jax.tree.unflatten(jax.tree.structure(tree), out)
