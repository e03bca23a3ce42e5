"""Structured mask functions: N:M groups and whole output channels.

Both follow the ``mask_fn(tree, sparsity, ...) -> mask tree`` protocol of
:mod:`jaxopt_lab.pruning.masks` (True = keep, all-True for unselected leaves, ``previous``
for nested masks) and select leaves with ``where``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_lab import _select
from jaxopt_lab.pruning import select
from jaxopt_lab.pruning.masks import all_true_like, check_sparsity, previous_leaves
from jaxopt_lab.pruning.settings import NMSettings, SparsitySettings

Params = Any


def _group_keep(scores: jax.Array, keep_per_group: jax.Array, axis: int = -1) -> jax.Array:
    """Within ``axis`` (size M), keeps the ``keep_per_group`` highest scores.

    Rank of entry i = number of entries that beat it (higher score, or equal score at
    a lower index). M is small, so M whole-array comparisons against one slice each are
    cheaper than a sort; they are elementwise, so a leaf sharded along any other axis (or
    along the group index next to ``axis``) is ranked where its shards live.
    """
    axis %= scores.ndim
    m = scores.shape[axis]
    index = lax.broadcasted_iota(jnp.int32, scores.shape, axis)
    rank = jnp.zeros(scores.shape, jnp.int32)
    for j in range(m):
        other = lax.index_in_dim(scores, j, axis, keepdims=True)
        beats = (other > scores) | ((other == scores) & (j < index))
        rank = rank + beats.astype(jnp.int32)
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


def _nm_keep(scores: jax.Array, axes: tuple[int, ...], m: int, keep: Any) -> jax.Array:
    """The N:M keep mask of ``scores`` grouped along the flattened contraction ``axes``.

    Contiguous ascending axes (a Dense input, HWI of a conv) are merged and split into
    ``(groups, m)`` in place: no transpose, so a leaf sharded along any axis keeps its
    layout (XLA splits a sharded axis into sharded groups when the shard length is a
    multiple of ``m``). Other axis orders are moved last first.
    """
    shape = scores.shape
    if list(axes) != list(range(axes[0], axes[0] + len(axes))):
        moved = _to_last(scores, axes)
        grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
        return _from_last(_group_keep(grouped, keep).reshape(moved.shape), axes, shape)
    first, last = axes[0], axes[-1] + 1
    length = math.prod(shape[first:last])
    grouped = scores.reshape(shape[:first] + (length // m, m) + shape[last:])
    return _group_keep(grouped, keep, axis=first + 1).reshape(shape)


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
            out.append(all_true_like(leaf))
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
            out.append(all_true_like(leaf))
            continue
        prune = lm - ln
        if sparsity is not None:
            prune = jnp.minimum(lm - ln, select.count_to_prune(sparsity, lm))
            # A traced NaN prunes every entry, as in the other mask functions, rather
            # than quietly falling back to the full N:M pattern.
            if not isinstance(sparsity, (int, float)):
                prune = jnp.where(jnp.isnan(jnp.asarray(sparsity, jnp.float32)), lm, prune)
        keep = _nm_keep(select.magnitude_scores(leaf, prev[i]), axes, lm, lm - prune)
        # Groups that straddle shards (a shard shorter than m) leave XLA free to replicate
        # the result; ``& all-True`` keeps the mask sharded like its leaf.
        out.append(keep & all_true_like(leaf))
    _select.report_fallbacks(fallbacks, "nm_mask")
    return jax.tree.unflatten(jax.tree.structure(tree), out)


def _channel_norm(x: Any, rest: tuple[int, ...], norm: str) -> jax.Array:
    """L1 or L2 norm over the ``rest`` axes, in float32 (shape: the channel axes, ascending).

    Summed with `_reproducible_sum`, so a leaf sharded along ``rest`` (partial sums per
    shard, then an all-reduce) gets the same norms, bit for bit, as the same leaf on one
    device: a float sum's rounding depends on its order, and the ranking of near-equal
    channels on the last bit.
    """
    x = jnp.asarray(x, jnp.float32)
    if norm == "l1":
        return _reproducible_sum(jnp.abs(x), rest)
    return jnp.sqrt(_reproducible_sum(jnp.square(x), rest))


@functools.partial(jax.jit, static_argnums=1)  # one program, not ~20 ops dispatched eagerly
def _reproducible_sum(v: jax.Array, rest: tuple[int, ...]) -> jax.Array:
    """The sum of the non-negative float32 ``v`` over ``rest``, independent of the order.

    Each entry is aligned to the largest exponent of its sum as a 32-bit integer (bits
    more than 32 below the largest entry's leading bit are dropped, the same for every
    order), cut into limbs narrow enough that ``n`` of them add in uint32 without
    overflow; integer sums are exact in any order, so only the final, fixed combination
    of the few limb sums rounds. NaN and infinity propagate as in a float sum.
    """
    n = math.prod(v.shape[a] for a in rest)
    bits = lax.bitcast_convert_type(v, jnp.uint32)
    biased = bits >> 23
    finite = biased < 255
    mantissa = jnp.where(finite & (biased > 0), (bits & 0x7FFFFF) | (1 << 23), bits & 0x7FFFFF)
    mantissa = jnp.where(finite, mantissa, jnp.uint32(0))
    exponent = jnp.where(finite, jnp.maximum(biased, 1), jnp.uint32(1))  # subnormals: 1
    top = jnp.max(exponent, axis=rest, keepdims=True, initial=jnp.uint32(1))
    shift = top - exponent
    aligned = jnp.where(shift < 32, (mantissa << 8) >> jnp.minimum(shift, 31), jnp.uint32(0))
    width = 32 - max(1, math.ceil(math.log2(n + 1)))  # n * (2**width - 1) < 2**32
    total = jnp.zeros(jnp.shape(top), jnp.float32)
    for k in reversed(range(math.ceil(32 / width))):
        limb = (aligned >> (k * width)) & ((1 << width) - 1)
        part = jnp.sum(limb, axis=rest, keepdims=True, dtype=jnp.uint32)
        total = total + part.astype(jnp.float32) * np.float32(2.0 ** (k * width))
    # ``aligned`` counts units of 2**(top - 150 - 8): 150 = bias + mantissa bits, 8 the shift.
    total = jnp.ldexp(total, top.astype(jnp.int32) - 158)
    total = jnp.where(jnp.any(jnp.isinf(v), axis=rest, keepdims=True), jnp.inf, total)
    total = jnp.where(jnp.any(jnp.isnan(v), axis=rest, keepdims=True), jnp.nan, total)
    return jnp.squeeze(total, axis=rest)


def _channels_last(per_channel: jax.Array, axes: tuple[int, ...], channels: int) -> jax.Array:
    """A per-channel array over the channel axes in ascending order, flattened in
    ``axes`` order (how the map lists a kernel's output units)."""
    order = np.argsort(np.argsort(axes))  # position of each of ``axes`` among the sorted
    return jnp.transpose(per_channel, order).reshape(channels)


def _channels_to_leaf(keep: jax.Array, axes: tuple[int, ...], leaf: Any) -> jax.Array:
    """The flat per-channel ``keep`` broadcast to ``leaf``'s shape (and sharding)."""
    shape = np.shape(leaf)
    keep = keep.reshape(tuple(shape[a] for a in axes))
    keep = jnp.transpose(keep, np.argsort(axes))  # back to ascending axis order
    expanded = [shape[a] if a in axes else 1 for a in range(len(shape))]
    # ``& all-True`` gives the mask the leaf's sharding (a broadcast constant would be
    # replicated on every device).
    return jnp.broadcast_to(keep.reshape(expanded), shape) & all_true_like(leaf)


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
            out.append(all_true_like(leaf))
            continue
        name = _select.path_str(path)
        s = _select.leaf_overrides(path, choice, base).sparsity
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"{name}: axis {axis} is out of range for shape {shape}")
        info = None if model_map is None else model_map.lookup(path)
        axes = (info.channel_axes if info is not None and info.role == "kernel"
                and info.channel_axes else (axis % len(shape),))
        channels = math.prod(shape[a] for a in axes)
        # Reduced over the other axes where the leaf lies (a sharded leaf sums its shards
        # and all-reduces one value per channel), never transposed into a gathered copy.
        rest = tuple(a for a in range(len(shape)) if a not in axes)
        alive = None
        if prev[i] is not None:
            alive = _channels_last(jnp.all(jnp.asarray(prev[i]), axis=rest), axes, channels)
        norms = _channels_last(_channel_norm(leaf, rest, norm), axes, channels)
        keep = select.keep_lowest(
            "magnitude", [(norms, alive)], select.count_to_prune(s, channels)
        )[0]
        out.append(_channels_to_leaf(keep, axes, leaf))
    return jax.tree.unflatten(jax.tree.structure(tree), out)
