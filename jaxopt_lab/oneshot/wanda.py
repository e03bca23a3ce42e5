"""Wanda (Sun et al. 2023): prune by ``|W| * ||X||`` without weight updates.

The score of weight ``W[k, j]`` (input ``k``, output ``j``) is ``|W[k, j]| * ||X[:, k]||_2``
over the calibration token rows. The paper compares weights *per output*: each output
(a column of a Flax ``(K, N)`` kernel; a row of PyTorch's ``(out, in)`` weight) loses exactly
``floor(sparsity * K)`` of its ``K`` inputs. ``scope="layer"`` ranks the whole kernel at once
(exactly ``floor(sparsity * K * N)``), and N:M keeps ``n`` of every ``m`` consecutive inputs
of each output. Ties follow the library's masks: pruned in index order as in
`jaxopt_lab.magnitude_mask`, and for N:M the earlier entries kept as in `jaxopt_lab.nm_mask`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab import _select
from jaxopt_lab.oneshot import _layers, _sharded, settings
from jaxopt_lab.oneshot._obs import keep_block, keep_top_per_column, prune_count
from jaxopt_lab.oneshot.settings import WandaSettings
from jaxopt_lab.oneshot.sparsegpt import check_pruning
from jaxopt_lab.pruning.masks import all_true_like

Params = Any
SCOPES = settings.SCOPES


@functools.partial(jax.jit, static_argnames=("sparsity", "n", "m", "scope"))
def _wanda(w, norm, *, sparsity, n, m, scope):
    score = jnp.abs(w.astype(jnp.float32)) * norm[:, None]
    k, ncol = w.shape
    if n is not None:
        groups = score.reshape(k // m, m, ncol).transpose(1, 0, 2).reshape(m, -1)
        keep = keep_top_per_column(groups, n, keep_first_ties=True)
        return keep.reshape(m, k // m, ncol).transpose(1, 0, 2).reshape(k, ncol)
    if scope == "layer":
        return keep_block(score, prune_count(sparsity, k * ncol))
    prune = prune_count(sparsity, k)
    return keep_top_per_column(score, k - prune)


def _check(name: str, k: int, *, sparsity, n, m, scope) -> None:
    """The settings checks of `wanda_matrix` (also run for sharded kernels)."""
    if scope not in SCOPES:
        raise ValueError(f"{name}: scope must be one of {SCOPES}, got {scope!r}")
    check_pruning(name, k, sparsity, n, m)


def wanda_matrix(
    w: jax.typing.ArrayLike,
    input_norm: jax.typing.ArrayLike,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    scope: str = "output",
    name: str = "weight",
) -> jax.Array:
    """The Wanda mask of one ``(K, N)`` matrix.

    Args:
      w: weights, Flax layout (rows = the ``K`` contracted inputs).
      input_norm: ``||X[:, k]||_2`` per input (``sqrt(diag(X^T X))``), shape ``(K,)``.
      sparsity: fraction pruned, in ``[0, 1]``.
      n, m: N:M along ``K`` instead (per output).
      scope: ``"output"`` (the paper: per output column) or ``"layer"``.
      name: what error messages call the layer.

    Returns:
      Bool ``(K, N)`` mask, True = kept.

    Raises:
      ValueError: naming ``name``, for bad shapes, sparsity outside ``[0, 1]``, invalid
        ``n:m``, an unknown scope, or non-finite or negative norms.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxopt_lab.oneshot import wanda_matrix
      >>> w = jnp.array([[1.0, 1.0], [2.0, 0.1]])
      >>> wanda_matrix(w, jnp.array([3.0, 1.0]), sparsity=0.5).tolist()
      [[True, True], [False, False]]
    """
    if np.ndim(w) != 2:
        raise ValueError(f"{name}: expected a (K, N) weight matrix, got shape {np.shape(w)}")
    k = np.shape(w)[0]
    if np.shape(input_norm) != (k,):
        raise ValueError(f"{name}: input norms of shape {np.shape(input_norm)} do not match "
                         f"K={k}")
    if scope not in SCOPES:
        raise ValueError(f"{name}: scope must be one of {SCOPES}, got {scope!r}")
    check_pruning(name, k, sparsity, n, m)
    norm = jnp.asarray(input_norm, jnp.float32)
    if not isinstance(norm, jax.core.Tracer):
        if not bool(jnp.isfinite(norm).all()):
            raise ValueError(f"{name}: input norms hold NaN or Inf")
        if bool((norm < 0).any()):
            # A norm is >= 0; a negative one would rank that input's weights upside down.
            raise ValueError(f"{name}: input norms must be >= 0, got minimum "
                             f"{float(norm.min())}")
    return _wanda(jnp.asarray(w), norm, sparsity=None if sparsity is None else float(sparsity),
                  n=n, m=m, scope=scope)


def wanda(
    params: Params,
    stats: Any,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    scope: str = "output",
    contracting: _layers.Contracting = None,
    model_map: Any = None,
    where: _select.Where = None,
) -> Params:
    """Wanda masks of every selected kernel -> a bool mask tree (True = kept).

    Args:
      params: a pytree of arrays.
      stats: per-kernel `LayerStats` (as for `gptq`); the norms are ``sqrt(diag(xtx))``.
      sparsity, n, m, scope: as in `wanda_matrix`; a ``where`` callable or mask may give
        a leaf its own `WandaSettings` or a mapping of some of its fields.
      contracting: ``{leaf path string: contracting axes}``; default every axis but the last.
      model_map: a `jaxopt_lab.ModelMap`: each kernel's contracting axes are read from it
        (``contracting`` entries still win).
      where: leaf selection (default: float leaves with ``ndim >= 2``).

    Returns:
      A bool tree with ``params``' structure (all True for unselected leaves), for
      ``apply_mask``, ``prune(..., )`` starting masks and ``to_sparse``.

    Sharded kernels: masks of ``NamedSharding``-sharded kernels are sharded like them and
    equal the single-device masks. Per output and N:M: the kernel must be sharded along
    its output axes (each shard ranks its own columns; a sharded contraction raises).
    ``scope="layer"``: any sharding (leading contracting axes), through the library's
    exact sharded selection, as `jaxopt_lab.magnitude_mask` of a sharded tree.

    Raises:
      ValueError: naming the leaf, for missing or empty statistics and the errors of
        `wanda_matrix`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> from jaxopt_lab.oneshot import hessian_accumulate, hessian_init, wanda
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> params = {"kernel": jax.random.normal(jax.random.key(1), (8, 4))}
      >>> stats = {"['kernel']": hessian_accumulate(hessian_init(8), x)}
      >>> masks = wanda(params, stats, n=2, m=4)
      >>> float(jol.sparsity(jol.apply_mask(params, masks)).overall)
      0.5
    """
    # Bad keyword arguments raise at the first selected leaf, naming it.
    base = _select.deferred_settings(WandaSettings, sparsity=sparsity, n=n, m=m, scope=scope)

    def one(name, path, leaf, choice):
        s = _select.leaf_overrides(name, choice, base)
        placed = _sharded.placement(leaf)
        if placed is not None:  # a NamedSharding-sharded kernel: no gather (see _sharded)
            f = _select.fields_of(s)
            return _sharded.wanda(name, path, leaf, stats, contracting, model_map, placed, f,
                                  mask_fn=_wanda, check=functools.partial(_check, **f))
        shape, axes, mat, st = _layers.kernel_matrix(name, path, leaf, stats, contracting,
                                                     model_map)
        norm = jnp.sqrt(jnp.maximum(jnp.diag(st.xtx), 0.0))
        masks = wanda_matrix(mat, norm, name=name, **_select.fields_of(s))
        return _layers.from_matrix(masks, shape, axes)

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    choices = _select.leaf_choices(params, where, model_map=model_map)
    out = [one(_select.path_str(p), p, x, c) if c is not False else all_true_like(x)
           for (p, x), (_, _, c) in zip(flat, choices)]
    return jax.tree.unflatten(treedef, out)
