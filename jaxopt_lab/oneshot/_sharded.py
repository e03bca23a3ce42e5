"""GPTQ, SparseGPT, Wanda and AWQ on kernels sharded with ``NamedSharding`` (private).

Given the shared ``K x K`` Hessian, GPTQ, N:M SparseGPT and Wanda per output (or N:M)
treat every output column of a ``(K, N)`` kernel on its own. A kernel sharded along its
output (non-contracting) axes is therefore processed where each shard lives: one
``shard_map`` over the kernel's mesh, the Hessian (or the input norms) replicated, each
device sweeping its own columns. Only a scalar crosses devices (the kernel's largest
magnitude, for the sweep's exact power-of-two normalisation) plus two flags per shard, and
the results (codes, scales, masks, new weights) come back sharded like the kernel. The
per-column arithmetic is the single-device arithmetic, so the results equal the unsharded
ones: bit for bit for GPTQ, N:M SparseGPT and Wanda, and for the masks of unstructured
SparseGPT; its kept weights come from per-shard updates that XLA may compile in another
operation order than the one-device program (on jax 0.12 they differ by up to 4 ulp; on
jax 0.10 they are bit-identical).

AWQ (`awq_group`) needs no ``shard_map``: its scale search reads the replicated Hessian
and activation means, quantizes column by column and sums each column's output error, so
one jitted program over the kernels of a fold group, each in its own ``(K, *outputs)``
layout, runs where the columns live; only the grid's losses (one float per exponent) are
reduced across devices. The loss of a group is summed kernel by kernel rather than over
the concatenated kernels, another float32 order: the chosen exponent can differ from one
device's only on a near-tie, and with the same exponent every value is bit-identical.

Unsupported layouts raise a ``ValueError`` naming the leaf instead of gathering it:

* a kernel sharded along a contracting axis, for GPTQ and SparseGPT: the sweep walks the
  ``K`` rows in order, each row's error compensating every later row, so a split ``K``
  would serialise the devices; Wanda per output or N:M, whose selection runs along ``K``;
  AWQ, whose groups and output error run along ``K``;
* codes of fewer than 8 bits packed along an output axis split into shards that do not
  hold whole words (GPTQ, and AWQ's folded ``(K, N)`` kernels, which are QTensors).

Unstructured SparseGPT ranks each block of rows across all outputs: on an output-sharded
kernel that selection is `_obs.keep_block_sharded` (bisection on the scores with a ``psum``
of a count per step), the same mask as on one device.

Wanda with ``scope="layer"`` ranks the whole kernel at once and takes any sharding: the
library's exact sharded selection (`jaxopt_lab.pruning.select.keep_above_k_lowest`, as
`jaxopt_lab.magnitude_mask` on sharded trees) picks the pruned scores without a gather.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_lab import _select
from jaxopt_lab.oneshot import _layers, _obs
from jaxopt_lab.oneshot.stats import check_stats
from jaxopt_lab.quant.qtensor import QTensor, pack, word_layout

Placement = tuple[Mesh, tuple]


def placement(leaf: Any) -> Placement | None:
    """``(mesh, spec)`` (the spec padded to the leaf's rank) of a concrete leaf sharded with
    ``NamedSharding`` over more than one device along some axis, else ``None``.

    Traced leaves (a caller's own ``jax.jit``) carry no concrete spec and take the
    single-device path, which XLA partitions as it sees fit.
    """
    if isinstance(leaf, jax.core.Tracer):
        return None
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding) or len(sharding.device_set) <= 1:
        return None
    spec = tuple(sharding.spec) + (None,) * (np.ndim(leaf) - len(sharding.spec))
    if all(a is None for a in spec):
        return None  # replicated: every device holds the whole leaf anyway
    return sharding.mesh, spec


def _mesh_axes(spec: tuple) -> tuple[str, ...]:
    out: list[str] = []
    for a in spec:
        if a is not None:
            out.extend(a if isinstance(a, tuple) else (a,))
    return tuple(out)


def _check_outputs_only(name: str, method: str, shape: tuple, axes: tuple, spec: tuple,
                        why: str) -> None:
    bad = tuple(a for a in axes if spec[a] is not None)
    if bad:
        raise ValueError(
            f"{name}: {method} of a kernel of shape {shape} sharded along its contracting "
            f"axes {bad} (PartitionSpec {P(*spec)}) is not supported ({why}); shard it "
            f"along its output axes (not {tuple(axes)}) or replicate it")


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


def _kernel(name: str, path: tuple, leaf: Any, stats: Any, contracting: Any, model_map: Any
            ) -> tuple[tuple[int, ...], tuple[int, ...], int, Any]:
    """``(shape, contracting axes, K, LayerStats)``, checked as `_layers.kernel_matrix`
    does but with the finiteness test reduced where the shards live (no host copy)."""
    if not _select.is_float_array(leaf) or np.ndim(leaf) < 2:
        raise ValueError(f"{name}: expected a float kernel with ndim >= 2, got "
                         f"{getattr(leaf, 'dtype', type(leaf))} of shape {np.shape(leaf)}")
    if not bool(_all_finite(leaf)):
        raise ValueError(f"{name}: the kernel holds NaN or Inf")
    shape = tuple(np.shape(leaf))
    axes = _layers.contracting_axes(name, shape, contracting, model_map, path)
    k = math.prod(shape[a] for a in axes)
    st = _layers.stats_leaf(stats, path, name)
    check_stats(name, st, k)
    return shape, axes, k, st


def _check_sweep(name: str, flags: jax.Array, damp: float) -> None:
    """`_obs.check_result` on the shards' flags ``(factor finite, weights finite)``."""
    flags = np.asarray(flags)
    if flags[:, 1].all():
        return
    if not flags[:, 0].all():
        raise ValueError(f"{name}: the damped Hessian is not positive definite; "
                         f"raise damp (now {damp})")
    raise ValueError(f"{name}: the error-compensated weights overflow float32 (the result is "
                     "not representable); scale the layer's weights down")


def _check_word_shards(name: str, bits: int, shape: tuple, spec: tuple, mesh: Mesh) -> None:
    """Packing shard by shard equals packing the whole axis only on word boundaries."""
    if bits == 8 or spec[-1] is None:
        return
    per_word, last = word_layout(bits)[0], _local(shape, spec, mesh, len(shape) - 1)
    if last % per_word:
        raise ValueError(
            f"{name}: {bits}-bit codes pack {per_word} per word along the last axis, "
            f"which PartitionSpec {P(*spec)} splits into shards of {last}: use shards "
            f"whose length is a multiple of {per_word}")


def _local(shape: tuple, spec: tuple, mesh: Mesh, axis: int) -> int:
    names = spec[axis]
    if names is None:
        return shape[axis]
    names = names if isinstance(names, tuple) else (names,)
    return shape[axis] // math.prod(mesh.shape[a] for a in names)


@functools.lru_cache(maxsize=64)
def _gptq_fn(mesh, spec, nax, bits, group_size, symmetric, act_order, static_groups,
             clip_search, damp, block_size):
    names = _mesh_axes(spec)
    out = spec[nax:]
    scale_spec = P(*out) if group_size is None else P(None, *out)

    def body(w, h):
        local = w.shape
        k = math.prod(local[:nax])
        res = _obs.sweep(w.reshape(k, -1), h, damp=damp, block_size=block_size, bits=bits,
                         symmetric=symmetric, group_size=group_size, act_order=act_order,
                         sparsity=None, n=None, m=None, static_groups=static_groups,
                         clip_search=clip_search, axis_name=names)
        lead = () if group_size is None else (k // group_size,)
        scale = res.scale.reshape(lead + local[nax:])
        zero = None if res.zero is None else res.zero.reshape(lead + local[nax:])
        flags = jnp.stack([res.factor_ok, jnp.isfinite(res.weights).all()])[None]
        return pack(res.codes.reshape(local), bits), scale, zero, flags

    out_specs = (P(*spec), scale_spec, None if symmetric else scale_spec, P(names))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(*spec), P()),
                                 out_specs=out_specs, check_vma=False))


def gptq(name: str, path: tuple, leaf: jax.Array, stats: Any, contracting: Any,
         model_map: Any, where: Placement, s: dict) -> QTensor:
    """`jaxopt_lab.oneshot.gptq` of one output-sharded kernel, shard by shard."""
    mesh, spec = where
    shape, axes, k, st = _kernel(name, path, leaf, stats, contracting, model_map)
    nax = len(axes)
    if axes != tuple(range(nax)):
        raise ValueError(f"{name}: GPTQ to a QTensor needs leading contracting axes, got "
                         f"{axes} for shape {shape}")
    _check_outputs_only(name, "GPTQ", shape, axes, spec,
                        "its sweep compensates each input row's error on every later row")
    bits, group_size = s["bits"], s["group_size"]
    _obs.check_quant(name, k, bits, group_size)
    _obs.check_damp(name, s["damp"])
    _obs.check_finite(name, st.xtx)
    _check_word_shards(name, bits, shape, spec, mesh)
    fn = _gptq_fn(mesh, spec, nax, int(bits), group_size, bool(s["symmetric"]),
                  bool(s["act_order"]), bool(s["static_groups"]), bool(s["clip_search"]),
                  float(s["damp"]), int(s["block_size"]))
    qvalue, scale, zero, flags = fn(leaf, jnp.asarray(st.xtx, jnp.float32))
    _check_sweep(name, flags, s["damp"])
    if group_size is None:
        meta = dict(granularity="channel", axis=tuple(range(nax, len(shape))))
    else:
        meta = dict(granularity="group", group_axis=axes, group_size=group_size)
    return QTensor(qvalue, scale, zero, bits=bits, shape=shape, dtype=leaf.dtype, **meta)


@functools.lru_cache(maxsize=64)
def _sparsegpt_fn(mesh, spec, axes, sparsity, n, m, bits, group_size, symmetric, damp,
                  block_size, total_cols):
    names = _mesh_axes(spec)
    rest = tuple(spec[i] for i in range(len(spec)) if i not in axes)

    def body(w, h, cols):
        local = w.shape
        res = _obs.sweep(_layers.as_matrix(w, axes), h, damp=damp, block_size=block_size,
                         bits=bits, symmetric=symmetric, group_size=group_size,
                         act_order=False, sparsity=sparsity, n=n, m=m, axis_name=names,
                         cols=cols.reshape(-1), total_cols=total_cols)
        flags = jnp.stack([res.factor_ok, jnp.isfinite(res.weights).all()])[None]
        return (_layers.from_matrix(res.weights.astype(w.dtype), local, axes),
                _layers.from_matrix(res.mask, local, axes), flags)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(*spec), P(), P(*rest)),
                                 out_specs=(P(*spec), P(*spec), P(names)), check_vma=False))


def sparsegpt(name: str, path: tuple, leaf: jax.Array, stats: Any, contracting: Any,
              model_map: Any, where: Placement, s: dict, *, check_pruning: Callable
              ) -> tuple[jax.Array, jax.Array]:
    """`jaxopt_lab.oneshot.sparsegpt` of one output-sharded kernel, shard by shard
    (``check_pruning``: sparsegpt's own check, passed in as that module imports this)."""
    mesh, spec = where
    shape, axes, k, st = _kernel(name, path, leaf, stats, contracting, model_map)
    n, m, bits = s["n"], s["m"], s["bits"]
    check_pruning(name, k, s["sparsity"], n, m)
    _check_outputs_only(name, "SparseGPT", shape, axes, spec,
                        "its sweep compensates each input row's error on every later row")
    if bits is not None:
        _obs.check_quant(name, k, bits, s["group_size"])
    _obs.check_damp(name, s["damp"])
    _obs.check_finite(name, st.xtx)
    sparsity = None if s["sparsity"] is None else float(s["sparsity"])
    out_shape = tuple(shape[i] for i in range(len(shape)) if i not in axes)
    total = math.prod(out_shape)
    fn = _sparsegpt_fn(mesh, spec, axes, sparsity, n, m, bits, s["group_size"],
                       bool(s["symmetric"]), float(s["damp"]), int(s["block_size"]), total)
    # The global index of every output column, sharded as the kernel's output axes: each
    # shard reads the indices of its own columns (unstructured pruning breaks ties by them).
    cols = jnp.arange(total, dtype=jnp.int32).reshape(out_shape)
    w2, mask, flags = fn(leaf, jnp.asarray(st.xtx, jnp.float32), cols)
    _check_sweep(name, flags, s["damp"])
    return w2, mask


@functools.lru_cache(maxsize=64)
def _wanda_fn(mask_fn, mesh, spec, axes, sparsity, n, m, scope):
    def body(w, norm):
        mask = mask_fn(_layers.as_matrix(w, axes), norm, sparsity=sparsity, n=n, m=m,
                      scope=scope)
        return _layers.from_matrix(mask, w.shape, axes)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(*spec), P()),
                                 out_specs=P(*spec), check_vma=False))


@functools.partial(jax.jit, static_argnames=("nax", "prune"))
def _wanda_layer(w, norm, *, nax, prune):
    from jaxopt_lab.pruning.select import keep_above_k_lowest

    # The score of `_wanda` in the kernel's own layout (its leading axes contract): the same
    # float32 products, and the flat order of (K, N), so ties are pruned in the same order.
    bcast = norm.reshape(w.shape[:nax] + (1,) * (w.ndim - nax))
    score = jnp.abs(w.astype(jnp.float32)) * bcast
    # Non-negative float32 scores order as their int32 bit patterns.
    return keep_above_k_lowest([lax.bitcast_convert_type(score, jnp.int32)], prune)[0]


def wanda(name: str, path: tuple, leaf: jax.Array, stats: Any, contracting: Any,
          model_map: Any, where: Placement, s: dict, *, mask_fn: Callable,
          check: Callable) -> jax.Array:
    """`jaxopt_lab.oneshot.wanda`'s mask of one sharded kernel. From wanda's module, which
    imports this one: ``mask_fn``, its jitted ``(K, N)`` mask; ``check(name, k)``, its
    settings checks."""
    mesh, spec = where
    shape, axes, k, st = _kernel(name, path, leaf, stats, contracting, model_map)
    check(name, k)
    # As `wanda` and `wanda_matrix`: the norms of the replicated (K, K) statistics.
    norm = jnp.asarray(jnp.sqrt(jnp.maximum(jnp.diag(st.xtx), 0.0)), jnp.float32)
    if not bool(jnp.isfinite(norm).all()):
        raise ValueError(f"{name}: input norms hold NaN or Inf")
    sparsity = None if s["sparsity"] is None else float(s["sparsity"])
    if s["scope"] == "layer" and s["n"] is None:
        if axes != tuple(range(len(axes))):
            raise ValueError(f"{name}: Wanda with scope='layer' of a sharded kernel needs "
                             f"leading contracting axes, got {axes} for shape {shape}")
        prune = _obs.prune_count(sparsity, math.prod(shape))
        return _wanda_layer(leaf, norm, nax=len(axes), prune=prune)
    _check_outputs_only(name, "Wanda per output (or N:M)", shape, axes, spec,
                        "each output's selection runs along the contraction; "
                        "scope='layer' takes any sharding")
    fn = _wanda_fn(mask_fn, mesh, spec, axes, sparsity, s["n"], s["m"], s["scope"])
    return fn(leaf, norm)


def awq_settings(settings: tuple, rank: int) -> dict:
    """A ``(K, N)`` matrix's quantizer settings (a static tuple, as ``awq._settings``) for a
    ``(K, *outputs)`` array of ``rank`` output axes: one scale per output element
    (channel), or groups along ``K``."""
    s = dict(settings)
    if s["axis"] is not None:
        s["axis"] = tuple(range(1, 1 + rank))
    return tuple(sorted(s.items()))


@functools.partial(jax.jit, static_argnames=("plan", "n_grid"))
def _awq_group(ws, h, act_mean, *, plan, n_grid):
    """AWQ's joint scale search of the kernels ``ws`` (one fold target, or one kernel) and
    their results, each kernel kept in its own ``(K, *outputs)`` layout.

    ``plan`` holds per kernel ``(axes, perm, search settings, settings, kind)``: ``perm``
    (or ``None``) reorders its rows into the target's channel order; ``kind`` is
    ``"qtensor"`` (``Q(diag(s) W)`` as a `QTensor`), ``"folded"`` (the same values as float
    in the kernel's layout) or ``"effective"`` (``Q(diag(s) W) / s``, the explicit form).

    The arithmetic is `awq_matrix`'s with two changes that keep every kernel where its
    shards live: the kernels are not concatenated (the output error of the group is the
    sum of each kernel's), and the round trip skips packing
    (`jaxopt_lab.quant.fake_quant.fake_quantize_array`, the same values).
    """
    from jaxopt_lab.quant.core import quantize_array
    from jaxopt_lab.quant.fake_quant import fake_quantize_array

    mats = [_layers.as_rows(w.astype(jnp.float32), p[0]) for w, p in zip(ws, plan)]
    chans = [m if p[1] is None else m[np.asarray(p[1])] for m, p in zip(mats, plan)]
    mean = jnp.maximum(act_mean, 1e-8)
    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def scales(a):
        s = mean ** a
        return s / jnp.sqrt(s.max() * s.min())

    def col(s, ndim):
        return s.reshape((-1,) + (1,) * (ndim - 1))

    def loss(a):
        s, total = scales(a), jnp.float32(0)
        for c, p in zip(chans, plan):
            sc = col(s, c.ndim)
            d = c - fake_quantize_array(c * sc, **dict(p[2]))[0] / sc
            hd = jnp.tensordot(h, d, axes=1, precision=lax.Precision.HIGHEST)
            total = total + jnp.sum(d * hd)
        return total

    # As `awq_matrix`: a non-finite loss counts as the worst; a = 0 is exactly RTN.
    losses = jax.vmap(loss)(alphas)
    losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    best = alphas[jnp.argmin(losses)]
    s = jnp.where(best == 0, 1.0, scales(best))
    outs = []
    for w, m, (axes, perm, _, sets, kind) in zip(ws, mats, plan):
        # The kernel's rows in its own order: s_rows[perm] = s (a static gather of K).
        s_rows = s if perm is None else s[np.argsort(np.asarray(perm))]
        sc = col(s_rows, m.ndim)
        if kind == "qtensor":
            outs.append(quantize_array(m * sc, **dict(sets)))
            continue
        x = fake_quantize_array(m * sc, **dict(sets))[0]
        x = x / sc if kind == "effective" else x
        outs.append(_layers.from_rows(x, w.shape, axes).astype(w.dtype))
    return outs, s, best


def awq_check(name: str, path: tuple, leaf: jax.Array, stats: Any, contracting: Any,
              model_map: Any, bits: int, group_size: int | None, folded: bool
              ) -> tuple[tuple[int, ...], tuple[int, ...], int, Any, bool]:
    """``(shape, axes, K, LayerStats, as a QTensor)`` of one kernel of an AWQ group holding
    a sharded kernel (checked as `_kernel` does, no host copy), with the layouts that would
    need a gather refused by name. A folded ``(K, N)`` kernel is returned as a QTensor."""
    shape, axes, k, st = _kernel(name, path, leaf, stats, contracting, model_map)
    _obs.check_quant(name, k, bits, group_size)
    qtensor = folded and axes == (0,) and len(shape) == 2
    where = placement(leaf)
    if where is None:
        return shape, axes, k, st, qtensor
    mesh, spec = where
    _check_outputs_only(name, "AWQ", shape, axes, spec,
                        "its groups and its output error sum along the contraction")
    if qtensor:
        _check_word_shards(name, bits, shape, spec, mesh)
    return shape, axes, k, st, qtensor


def awq_group(leaves: list, plan: tuple, h: jax.Array, act_mean: jax.Array, *, n_grid: int
              ) -> tuple[list, jax.Array, jax.Array]:
    """Runs `_awq_group` (``(outputs, s, alpha)``); the kernels stay where they live."""
    return _awq_group(list(leaves), jnp.asarray(h, jnp.float32),
                      jnp.asarray(act_mean, jnp.float32), plan=plan, n_grid=int(n_grid))
