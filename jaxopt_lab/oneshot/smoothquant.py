"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before W8A8.

For a kernel ``W`` (``(K, N)``) fed by activations ``X`` with per-channel maxima
``max|X_k|``, ``s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)``; then
``X W = (X / s) (s W)``: the input is divided by ``s`` -- folded into whatever produced it
(a LayerNorm's scale and bias, or the previous Dense's output columns) -- and the kernel's
rows are multiplied by ``s``. Float outputs are unchanged; int8 activations see a flatter
range. Kernels sharing one input (Q, K and V) must share ``s``: pass all their rows'
maxima together (``weight_absmax`` the elementwise maximum over them).

Where the fold is exact: a pre-LN block (LLaMA, pre-LN BERT/GPT), whose norm output feeds
only the Q/K/V or up/gate kernels. In a post-LN BERT the norm output also carries the
residual stream, so folding into it changes the model; there only the attention-output
kernel folds exactly (into the value projection's output columns, since the attention
context is linear in V), and other kernels need the scale kept explicit.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def smooth_scales(act_absmax: jax.typing.ArrayLike, weight_absmax: jax.typing.ArrayLike, *,
                  alpha: float = 0.5, name: str = "layer") -> jax.Array:
    """Per-input-channel smoothing factors ``s`` (shape ``(K,)``, positive and finite).

    Args:
      act_absmax: ``max |X_k|`` over the calibration rows (`LayerStats.abs_max`).
      weight_absmax: ``max_j |W[k, j]|`` per input channel (over every kernel reading X).
      alpha: migration strength in ``[0, 1]`` (0: nothing moves; 1: all into the weights).
      name: what error messages call the layer.

    Returns:
      ``s``; channels with a zero activation or weight maximum get ``s = 1``.

    Raises:
      ValueError: naming ``name``, for alpha outside ``[0, 1]``, mismatched shapes, or
        non-finite maxima.

    Examples:
      >>> import jax.numpy as jnp
      >>> smooth_scales(jnp.array([16.0, 1.0]), jnp.array([1.0, 1.0]), alpha=0.5).tolist()
      [4.0, 1.0]
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha!r}")
    a = jnp.asarray(act_absmax, jnp.float32)
    w = jnp.asarray(weight_absmax, jnp.float32)
    if a.ndim != 1 or a.shape != w.shape:
        raise ValueError(f"{name}: activation maxima {a.shape} and weight maxima {w.shape} "
                         "must be the same (K,) shape")
    if not isinstance(a, jax.core.Tracer) and not bool(
            np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(w)).all()):
        raise ValueError(f"{name}: activation or weight maxima hold NaN or Inf")
    ok = (a > 0) & (w > 0)
    s = jnp.where(ok, jnp.where(ok, a, 1.0) ** alpha / jnp.where(ok, w, 1.0) ** (1 - alpha),
                  1.0)
    return jnp.clip(s, 1e-5, 1e5)  # keeps the folded scales in float32's comfortable range


def smooth_layernorm(ln_params: dict, kernels: list[jax.Array], s: jax.Array
                     ) -> tuple[dict, list[jax.Array]]:
    """Folds ``1 / s`` into a LayerNorm (``scale``, ``bias``) and ``s`` into the rows of the
    ``(K, N)`` kernels that read its output: the float model computes the same function.

    Examples:
      >>> import jax.numpy as jnp
      >>> ln = {"scale": jnp.ones(2), "bias": jnp.zeros(2)}
      >>> ln2, (w2,) = smooth_layernorm(ln, [jnp.ones((2, 3))], jnp.array([2.0, 1.0]))
      >>> ln2["scale"].tolist(), w2[:, 0].tolist()
      ([0.5, 1.0], [2.0, 1.0])
    """
    k = np.shape(ln_params["scale"])
    if np.shape(s) != k or len(k) != 1:
        raise ValueError(f"smooth_layernorm: s of shape {np.shape(s)} does not match the "
                         f"norm's scale {k}")
    for i, w in enumerate(kernels):
        if np.ndim(w) != 2 or np.shape(w)[0] != k[0]:
            raise ValueError(f"smooth_layernorm: kernels[{i}] of shape {np.shape(w)} must be "
                             f"2-D with {k[0]} rows (the norm's K)")
    out = dict(ln_params)
    out["scale"] = ln_params["scale"] / s
    if "bias" in ln_params:
        out["bias"] = ln_params["bias"] / s
    return out, [k * s[:, None] for k in kernels]


@functools.partial(jax.jit, static_argnames="axes")
def _row_absmax(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``max |W_k|`` per row of a kernel (its contracting ``axes`` flattened, in order),
    reduced in the kernel's own layout so a sharded kernel is reduced where it lives."""
    from jaxopt_lab.oneshot import _layers

    rows = _layers.as_rows(jnp.asarray(w, jnp.float32), axes)
    return jnp.max(jnp.abs(rows), axis=tuple(range(1, rows.ndim)))


def smooth(params: Any, stats: Any, *, model_map: Any, alpha: float = 0.5,
           contracting: Any = None, where: Any = None) -> tuple[Any, dict[str, str]]:
    """SmoothQuant of a whole model: every kernel whose input the model map can rescale
    exactly (`ModelMap.fold_target`) is smoothed; the float model's function is unchanged.

    Kernels sharing a target (q, k, v after one norm) share ``s``, computed from the
    activation maxima of their common input and the maxima of all their rows. A kernel
    without a target is left as it is (smoothing it would need an explicit ``x / s`` op,
    which is what SmoothQuant avoids) and reported with the reason.

    Args:
      params: the variables the map was traced with, or a subtree of them.
      stats: per-kernel `LayerStats` (e.g. from `calibration_stats`).
      model_map: the model's `jaxopt_lab.ModelMap`.
      alpha: migration strength, as in `smooth_scales`.
      contracting: ``{leaf path string: contracting axes}`` (default: the map's).
      where: kernel selection (default: the map's kernels).

    Returns:
      ``(params, how)``: the smoothed tree and ``{leaf path string: one line}`` per
      selected kernel (``"smoothed into ..."`` or ``"not smoothed: why"``).

    Raises:
      ValueError: naming the leaf, for missing statistics and the errors of `smooth_scales`.
    """
    from jaxopt_lab import _select
    from jaxopt_lab.core import foldflow
    from jaxopt_lab.core.mapping import path_names
    from jaxopt_lab.oneshot import _layers
    from jaxopt_lab.oneshot.stats import check_stats

    leaves = {path_names(p): (p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    how: dict[str, str] = {}
    targets: dict[Any, list] = {}
    for path, _, choice in _select.leaf_choices(params, where, model_map=model_map):
        if choice is False:
            continue
        name = _select.path_str(path)
        t = model_map.fold_target(path)
        if t is None:
            how[name] = f"not smoothed: {model_map.fold_reason(path)}"
        else:
            targets.setdefault(t, []).append(path_names(path))
    tree = params
    for t, members in targets.items():
        w_max, act = None, None
        for fl in t.kernels:
            hits = [k for k in leaves if fl.path[len(fl.path) - len(k):] == k]
            if len(hits) != 1:
                raise ValueError(f"smooth: kernel {'/'.join(fl.path)} is not in the tree")
            path, leaf = leaves[hits[0]]
            name = _select.path_str(path)
            shape = tuple(np.shape(leaf))
            axes = _layers.contracting_axes(name, shape, contracting, model_map, path)
            k = int(np.prod([shape[a] for a in axes]))
            perm = np.asarray(foldflow.rows_to_channels(np.arange(k), shape, axes, fl.axes))
            rows = _row_absmax(leaf, axes)[perm]
            w_max = rows if w_max is None else jnp.maximum(w_max, rows)
            if hits[0] in members and act is None:
                st = _layers.stats_leaf(stats, path, name)
                check_stats(name, st, k)
                act = jnp.asarray(st.abs_max)[perm]
        s = smooth_scales(act, w_max, alpha=alpha, name="/".join(t.divide[0].path))
        tree = foldflow.fold_scale(tree, t, s)
        for m in members:
            how[_select.path_str(leaves[m][0])] = (
                f"smoothed into {t.kind} " + ", ".join("/".join(f.path) for f in t.divide))
    return tree, how
