"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling before rounding.

Input channels that carry large activations matter more; scaling their weight rows up by
``s_k`` before round-to-nearest (and the input down by ``s_k``) protects them. AWQ searches
``s = mean|X_k|^a`` (normalized so ``sqrt(max s * min s) = 1``) over a grid of ``a`` in
``[0, 1)`` and keeps the one with the smallest output error ``||X W - (X / s) Q(s W)||``,
computed exactly from ``H = X^T X``. ``a = 0`` is plain round-to-nearest, so the chosen
scales are never worse than it on the calibration inputs. All grid points are evaluated in
one compiled program (``vmap``).

The returned ``s`` must divide the kernel's input: fold it into the op before where that
op feeds only this kernel through linear maps (`fold_scale_into_norm` for a pre-LN norm,
`fold_scale_into_dense` for a previous Dense's output columns), otherwise keep it explicit
(``x / s`` before the matmul). `awq_matrix` also returns the
effective weights ``Q(s W) / s`` that both forms compute.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab import _select
from jaxopt_lab.oneshot import _obs
from jaxopt_lab.quant.core import leaf_settings, quantize_array
from jaxopt_lab.quant.settings import QuantSettings
from jaxopt_lab.quant.qtensor import QTensor


class AWQResult(NamedTuple):
    """``qtensor``: ``Q(diag(s) W)``; ``scales``: ``s`` (``(K,)``); ``alpha``: the chosen
    exponent; ``effective``: ``Q(s W) / s`` as float ``(K, N)``."""

    qtensor: QTensor
    scales: jax.Array
    alpha: jax.Array
    effective: jax.Array


def _settings(w, bits, group_size, symmetric, name: str) -> tuple:
    """`jaxopt_lab.quantize`'s resolved settings for a ``(K, N)`` kernel, as a static tuple."""
    base = _select.settings(name, QuantSettings, bits=bits, group_size=group_size,
                            granularity="channel" if group_size is None else "group",
                            symmetric=symmetric)
    return tuple(sorted(leaf_settings(name, w, base, True).items()))


@functools.partial(jax.jit, static_argnames=("settings", "n_grid"))
def _search(w, h, act_mean, *, settings, n_grid):
    s_set = dict(settings)
    mean = jnp.maximum(act_mean, 1e-8)
    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def scales(a):
        s = mean ** a
        return s / jnp.sqrt(s.max() * s.min())

    def loss(a):
        s = scales(a)
        eff = quantize_array(w * s[:, None], **s_set).dequantize(jnp.float32) / s[:, None]
        d = w - eff
        return jnp.sum(d * jnp.matmul(h, d, precision=jax.lax.Precision.HIGHEST))

    # A non-finite loss counts as the worst: argmin would pick a NaN (or an overflowed
    # -inf), and those come from weights near float32's max whose scaled copy overflowed
    # (an all-NaN QTensor). With every loss non-finite, argmin's first index is a = 0,
    # plain round-to-nearest. Finite losses (every normal-range input) are untouched.
    losses = jax.vmap(loss)(alphas)
    losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    best = alphas[jnp.argmin(losses)]
    s = jnp.where(best == 0, 1.0, scales(best))  # a = 0 is exactly round-to-nearest
    qt = quantize_array(w * s[:, None], **s_set)
    return qt, s, best, qt.dequantize(jnp.float32) / s[:, None]


def awq_matrix(
    w: jax.typing.ArrayLike,
    h: jax.typing.ArrayLike,
    act_mean: jax.typing.ArrayLike,
    *,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    n_grid: int = 20,
    name: str = "weight",
) -> AWQResult:
    """AWQ scale search for one ``(K, N)`` kernel.

    Args:
      w: float weights, Flax layout.
      h: ``X^T X`` of the calibration inputs (the error is measured with it).
      act_mean: ``mean |X_k|`` per input channel (``abs_sum / count`` of `LayerStats`).
      bits, group_size, symmetric: the round-to-nearest quantizer (`jaxopt_lab.quantize`).
      n_grid: exponents ``0, 1/n_grid, ..., (n_grid - 1)/n_grid`` are tried.
      name: what error messages call the layer.

    Returns:
      An `AWQResult`.

    Raises:
      ValueError: naming ``name``, for bad shapes, bits, a group size that does not divide
        ``K``, or non-finite statistics.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> from jaxopt_lab.oneshot import awq_matrix
      >>> x = jax.random.normal(jax.random.key(0), (64, 8)) * jnp.arange(1.0, 9.0)[None]
      >>> w = jax.random.normal(jax.random.key(1), (8, 4))
      >>> r = awq_matrix(w, x.T @ x, jnp.abs(x).mean(0), bits=3)
      >>> err = lambda v: float(jnp.linalg.norm(x @ (w - v)))
      >>> err(r.effective) <= err(jol.dequantize(jol.quantize(w, bits=3)))
      True
    """
    k, _ = _obs.check_matrix(name, w, h)
    _obs.check_quant(name, k, bits, group_size)
    if jnp.shape(act_mean) != (k,):
        raise ValueError(f"{name}: activation means of shape {jnp.shape(act_mean)} do not "
                         f"match K={k}")
    _obs.check_finite(name, h)
    if not bool(jnp.isfinite(jnp.asarray(act_mean)).all()):
        raise ValueError(f"{name}: activation means hold NaN or Inf")
    if int(n_grid) < 1:
        raise ValueError(f"{name}: n_grid must be >= 1, got {n_grid}")
    return AWQResult(*_search(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                              jnp.asarray(act_mean, jnp.float32),
                              settings=_settings(jnp.asarray(w, jnp.float32), int(bits),
                                                 group_size, bool(symmetric), name),
                              n_grid=int(n_grid)))


def _check_scale(name: str, s, k: int) -> jax.Array:
    s = jnp.asarray(s, jnp.float32)
    if s.shape != (k,):
        raise ValueError(f"{name}: scales of shape {s.shape} do not match the {k} channels")
    if not isinstance(s, jax.core.Tracer) and not bool(((s > 0) & jnp.isfinite(s)).all()):
        raise ValueError(f"{name}: scales must be positive and finite")
    return s


def fold_scale_into_dense(params: dict, s: jax.typing.ArrayLike, *, name: str = "dense"
                          ) -> dict:
    """Divides a previous Dense's output columns (``kernel[..., j]`` and ``bias[j]``) by
    ``s``: its output becomes ``y / s``, the input AWQ's ``Q(s W)`` expects.

    Exact only where that output reaches the quantized kernel through linear maps alone
    (e.g. the value projection before an attention-output kernel: the context is a convex
    mix of value rows, per channel) and feeds nothing else.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = fold_scale_into_dense({"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
      ...                           jnp.array([2.0, 4.0]))
      >>> p["kernel"][0].tolist(), p["bias"].tolist()
      ([0.5, 0.25], [0.5, 0.25])
    """
    k = params["kernel"]
    s = _check_scale(name, s, k.shape[-1])
    out = dict(params)
    out["kernel"] = k / s.reshape((1,) * (k.ndim - 1) + (-1,))
    if "bias" in params:
        out["bias"] = params["bias"] / s
    return out


def fold_scale_into_norm(params: dict, s: jax.typing.ArrayLike, *, name: str = "norm"
                         ) -> dict:
    """Divides a norm's ``scale`` and ``bias`` by ``s`` (pre-LN blocks, where the norm's
    output feeds only the quantized kernels).

    Examples:
      >>> import jax.numpy as jnp
      >>> fold_scale_into_norm({"scale": jnp.ones(2)}, jnp.array([2.0, 1.0]))["scale"].tolist()
      [0.5, 1.0]
    """
    s = _check_scale(name, s, params["scale"].shape[-1])
    out = dict(params)
    out["scale"] = params["scale"] / s
    if "bias" in params:
        out["bias"] = params["bias"] / s
    return out


class AWQModelResult(NamedTuple):
    """What `awq` did.

    Attributes:
      params: the tree with every selected kernel quantized. A kernel whose scale was
        folded holds ``Q(diag(s) W)`` (a `QTensor` for a ``(K, N)`` kernel, the same values
        as float in the kernel's own layout otherwise) and its fold target holds ``1 / s``;
        a kernel with no exact fold holds the explicit-scale effective weights
        ``Q(diag(s) W) / s`` as float (the output ``(x / s) @ Q(s W)`` computes).
      scales: ``{leaf path string: s}`` per kernel row (its contracting axes flattened).
      how: ``{leaf path string: one line}``: ``"folded into ..."`` or ``"explicit: why"``.
    """

    params: Any
    scales: dict[str, jax.Array]
    how: dict[str, str]


def awq(
    params: Any,
    stats: Any,
    *,
    model_map: Any = None,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    n_grid: int = 20,
    fold: bool = True,
    contracting: Any = None,
    where: Any = None,
) -> AWQModelResult:
    """AWQ of every selected kernel, each scale folded where the model map says it is exact.

    For each kernel the map's `ModelMap.fold_target` names the op that can absorb
    ``x / s``: a norm's scale and bias, or the previous kernel's output columns and bias
    (e.g. the value projection before an attention output). Kernels sharing one target
    (q, k, v after one norm) get one joint scale search (their outputs' errors summed) and
    the same ``s``; a target kernel is quantized after the ``1 / s`` folded into it. Where
    no target exists (GELU or a residual add between, the model input...), the scale stays
    explicit, as `awq_matrix` computes it.

    Args:
      params: the variables the map was traced with, or a subtree (``variables["params"]``).
      stats: per-kernel `LayerStats` as for `jaxopt_lab.oneshot.gptq` (e.g. from
        `calibration_stats`).
      model_map: a `jaxopt_lab.ModelMap` of the model (without one, every scale is explicit).
      bits, group_size, symmetric, n_grid: as in `awq_matrix`; a ``where`` callable may
        override ``bits``, ``group_size`` and ``symmetric`` per leaf (members of a shared
        fold take the first member's).
      fold: False keeps every scale explicit.
      contracting: ``{leaf path string: contracting axes}`` (default: the map's).
      where: kernel selection (default: the map's kernels, else float leaves with
        ``ndim >= 2``).

    Returns:
      An `AWQModelResult`.

    Raises:
      ValueError: naming the leaf, for missing statistics and the errors of `awq_matrix`.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_lab as jol
      >>> from jaxopt_lab.oneshot import awq, calibration_stats
      >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> v = model.init(jax.random.key(1), x)
      >>> mm = jol.model_map(model, v, x)
      >>> res = awq(v["params"], calibration_stats(model, v, [x]), model_map=mm, bits=4)
      >>> res.how["['layers_2']['kernel']"]
      'folded into kernel params/layers_0/kernel, params/layers_0/bias'
    """
    import numpy as np

    from jaxopt_lab import _select
    from jaxopt_lab.core import foldflow
    from jaxopt_lab.core.mapping import path_names
    from jaxopt_lab.oneshot import _layers, _sharded
    from jaxopt_lab.quant.core import quantize_array

    base = _select.settings("awq", QuantSettings, bits=bits, group_size=group_size,
                            granularity="channel" if group_size is None else "group",
                            symmetric=symmetric)
    chosen = {}
    for path, _, choice in _select.leaf_choices(params, where, model_map=model_map):
        if choice is False:
            continue
        name = _select.path_str(path)
        record = _select.leaf_overrides(name, choice, base)
        chosen[path_names(path)] = (name, path, dict(
            bits=record.bits, group_size=record.group_size, symmetric=record.symmetric))

    def target_of(names):
        if model_map is None or not fold:
            return None
        return model_map.fold_target(names)

    def find(names_full):
        """The selected kernel whose (subtree) names end ``names_full``."""
        hits = [k for k in chosen if names_full[len(names_full) - len(k):] == k]
        return hits[0] if len(hits) == 1 else None

    # Groups: one per fold target (its selected kernels), else one per kernel.
    groups: dict[Any, list] = {}
    for names in chosen:
        t = target_of(names)
        groups.setdefault(t if t is not None else names, []).append(names)
    # A target that divides a selected kernel must be folded before that kernel is quantized.
    order, pending = [], list(groups)
    while pending:
        for g in pending:
            blockers = {find(fl.path) for h in pending if h is not g
                        and isinstance(h, foldflow.FoldTarget) for fl in h.divide}
            if not any(m in blockers for m in groups[g]):
                order.append(g)
                pending.remove(g)
                break
        else:  # a cycle cannot come from a traced model; keep the rest in map order
            order += pending
            pending = []

    tree = params
    leaves = {path_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    new: dict = {}
    scales: dict[str, jax.Array] = {}
    how: dict[str, str] = {}

    def matrix(names):
        name, path, s = chosen[names]
        leaf = leaves[names]
        shape, axes, mat, st = _layers.kernel_matrix(name, path, leaf, stats, contracting,
                                                     model_map)
        _obs.check_quant(name, mat.shape[0], s["bits"], s["group_size"])
        return name, shape, axes, jnp.asarray(mat, jnp.float32), st, s

    def unsharded(g, members):
        """The single-device folded path: one search over the members' concatenated
        matrices in the target's channel order; fills ``new`` and ``scales``."""
        mats = [matrix(m) for m in members]
        perms = []
        for (_, shape, axes, w, _, _), m in zip(mats, members):
            fl = next(f for f in g.kernels if f.path[len(f.path) - len(m):] == m)
            rows = np.arange(w.shape[0])
            perms.append(np.asarray(foldflow.rows_to_channels(rows, shape, axes, fl.axes)))
        name0, _, _, _, st0, s0 = mats[0]
        p0 = perms[0]
        w_cat = jnp.concatenate([w[p] for (_, _, _, w, _, _), p in zip(mats, perms)], axis=1)
        r = awq_matrix(w_cat, st0.xtx[p0][:, p0], (st0.abs_sum / st0.count)[p0],
                       n_grid=n_grid, name=name0, **s0)
        s_chan = r.scales
        for (name, shape, axes, w, _, s), p, m in zip(mats, perms, members):
            s_rows = jnp.zeros_like(s_chan).at[p].set(s_chan)
            settings = _settings(w, s["bits"], s["group_size"], s["symmetric"], name)
            qt = quantize_array(w * s_rows[:, None], **dict(settings))
            dtype = jnp.asarray(leaves[m]).dtype
            if axes == (0,) and len(shape) == 2 and qt.shape == tuple(shape):
                new[m] = qt
            else:
                new[m] = _layers.from_matrix(qt.dequantize(jnp.float32), shape, axes
                                             ).astype(dtype)
            scales[name] = s_rows
        return s_chan

    def sharded(g, members):
        """The group's results where its kernels live (`_sharded.awq_group`):
        ``({member: new leaf}, {member: s_rows}, s in channel order)``."""
        folded = isinstance(g, foldflow.FoldTarget)
        infos, plan = [], []
        for m in members:
            name, path, s = chosen[m]
            shape, axes, k, st, qtensor = _sharded.awq_check(
                name, path, leaves[m], stats, contracting, model_map, s["bits"],
                s["group_size"], folded)
            perm = None
            if folded:
                fl = next(f for f in g.kernels if f.path[len(f.path) - len(m):] == m)
                p = np.asarray(foldflow.rows_to_channels(np.arange(k), shape, axes, fl.axes))
                perm = None if (p == np.arange(k)).all() else tuple(int(i) for i in p)
            infos.append((name, k, st, s, perm))
            own = _settings(np.zeros((k, 1), np.float32), s["bits"], s["group_size"],
                            s["symmetric"], name)  # the (K, N) layout, read from K alone
            plan.append([axes, perm, None, own, len(shape) - len(axes),
                         "qtensor" if qtensor else "folded" if folded else "effective"])
        name0, k0, st0, s0, _ = infos[0]
        search = _settings(np.zeros((k0, 1), np.float32), s0["bits"], s0["group_size"],
                           s0["symmetric"], name0)
        plan = tuple((axes, perm, _sharded.awq_settings(search, nout),
                      _sharded.awq_settings(own, nout), kind)
                     for axes, perm, _, own, nout, kind in plan)
        p0 = np.arange(k0) if infos[0][4] is None else np.asarray(infos[0][4])
        h, mean = st0.xtx[p0][:, p0], (st0.abs_sum / st0.count)[p0]
        _obs.check_finite(name0, h)
        if not bool(jnp.isfinite(jnp.asarray(mean)).all()):
            raise ValueError(f"{name0}: activation means hold NaN or Inf")
        if int(n_grid) < 1:
            raise ValueError(f"{name0}: n_grid must be >= 1, got {n_grid}")
        outs, s_chan, _ = _sharded.awq_group([leaves[m] for m in members], plan, h, mean,
                                             n_grid=n_grid)
        rows = {m: s_chan if perm is None else jnp.zeros_like(s_chan).at[
            np.asarray(perm)].set(s_chan) for m, (_, _, _, _, perm) in zip(members, infos)}
        return dict(zip(members, outs)), rows, s_chan

    def on_mesh(members):
        return any(_sharded.placement(leaves[m]) is not None for m in members)

    for g in order:
        members = groups[g]
        if not isinstance(g, foldflow.FoldTarget):
            name = chosen[g][0]
            if on_mesh([g]):
                got, rows, _ = sharded(g, [g])
                new[g], scales[name] = got[g], rows[g]
            else:
                name, shape, axes, w, st, s = matrix(g)
                r = awq_matrix(w, st.xtx, st.abs_sum / st.count, n_grid=n_grid, name=name,
                               **s)
                new[g] = _layers.from_matrix(r.effective, shape, axes).astype(
                    jnp.asarray(leaves[g]).dtype)
                scales[name] = r.scales
            why = "fold disabled" if model_map is not None and not fold else (
                "no model map" if model_map is None else model_map.fold_reason(g))
            how[name] = f"explicit: {why}"
            continue
        if on_mesh(members):
            got, rows, s_chan = sharded(g, members)
            new.update(got)
            scales.update({chosen[m][0]: rows[m] for m in members})
        else:
            s_chan = unsharded(g, members)
        for m in members:
            name = chosen[m][0]
            shared = ["/".join(f.path) for f in g.kernels if find(f.path) != m]
            how[name] = (f"folded into {g.kind} "
                         + ", ".join("/".join(f.path) for f in g.divide)
                         + (f" (shared with {', '.join(shared)})" if shared else ""))
        # Fold 1/s into the target; unselected kernels sharing it take s in float.
        others = [f for f in g.kernels if find(f.path) not in members]
        target = foldflow.FoldTarget(g.kind, g.divide, tuple(others), g.size)
        tree = foldflow.fold_scale(tree, target, s_chan)
        leaves = {path_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def put(path, leaf):
        return new.get(path_names(path), leaf)

    tree = jax.tree_util.tree_map_with_path(put, tree)
    return AWQModelResult(tree, scales, how)
