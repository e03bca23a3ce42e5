"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with second-order weight updates.

Rows of a ``(K, N)`` kernel are visited in order; in each block of rows the mask keeps the
weights of largest ``w^2 / [H^-1]_kk^2`` (unstructured: exactly the block's share of
``floor(sparsity * K * N)``; N:M: ``n`` of every ``m`` consecutive inputs of each output),
and each pruned (optionally also quantized) row's error is compensated on the rows after it
through the Cholesky factor of the damped ``H^-1`` -- the GPTQ sweep with a mask.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_lab import _select
from jaxopt_lab.oneshot import _layers, _obs, _sharded
from jaxopt_lab.oneshot.settings import SparseGPTSettings
from jaxopt_lab.pruning.masks import all_true_like

Params = Any


def check_pruning(name: str, k: int, sparsity: Any, n: int | None, m: int | None) -> None:
    """Validates a sparsity or an ``n:m`` pattern (exactly one of them)."""
    if (n is None) != (m is None):
        raise ValueError(f"{name}: give both n and m for N:M sparsity, got n={n}, m={m}")
    if n is not None:
        if sparsity is not None:
            raise ValueError(f"{name}: give either sparsity or n:m, not both")
        if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
            raise ValueError(f"{name}: need integers 0 <= n <= m, m >= 1; got {n}:{m}")
        if k % m:
            raise ValueError(f"{name}: the contraction K={k} is not divisible by m={m}")
        return
    if sparsity is None:
        raise ValueError(f"{name}: sparsity is required (a number in [0, 1]) or n and m")
    if isinstance(sparsity, jax.core.Tracer) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{name}: sparsity must be a Python number, got {sparsity!r}")
    if not 0.0 <= float(sparsity) <= 1.0 or math.isnan(sparsity):
        raise ValueError(f"{name}: sparsity must be in [0, 1], got {sparsity!r}")


def sparsegpt_matrix(
    w: jax.typing.ArrayLike,
    h: jax.typing.ArrayLike,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "weight",
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT of one ``(K, N)`` matrix with Hessian ``h = X^T X``.

    Args:
      w: float weights, Flax layout (rows = the ``K`` contracted inputs).
      h: ``X^T X`` of the calibration inputs.
      sparsity: fraction pruned, in ``[0, 1]``: exactly ``floor(sparsity * K * N)`` zeros.
      n, m: N:M sparsity along ``K`` instead (``n`` kept of every ``m`` inputs of each output).
      bits: quantize the kept weights jointly (GPTQ, as the paper's joint mode), or ``None``.
      group_size, symmetric: the quantizer, as in `gptq_matrix`.
      damp: dampening relative to the mean diagonal of ``H``; ``inf``: no compensation.
      block_size: rows per block (mask selection and lazy updates).
      name: what error messages call the layer.

    Returns:
      ``(weights, mask)``: the updated float weights (exact zeros where pruned; the
      quantized values when ``bits`` is set) in ``w``'s dtype, and the bool mask
      (True = kept), usable with ``apply_mask``, ``prune`` and ``to_sparse``.

    Raises:
      ValueError: naming ``name``, for bad shapes, sparsity outside ``[0, 1]``, an invalid
        ``n:m``, ``K`` not divisible by ``m`` or ``group_size``, a non-finite Hessian or
        weights, and (for concrete input) a damped Hessian that is not positive definite
        or a result beyond float32's range (weights near its limit, whose compensation
        does not fit; weights of any finite size are swept without overflowing).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt_lab.oneshot import sparsegpt_matrix
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 4))
      >>> w2, mask = sparsegpt_matrix(w, x.T @ x, n=2, m=4)
      >>> mask.reshape(2, 4, 4).sum(1).tolist()
      [[2, 2, 2, 2], [2, 2, 2, 2]]
      >>> bool((w2 == 0).sum() == 16)
      True
    """
    k, _ = _obs.check_matrix(name, w, h)
    check_pruning(name, k, sparsity, n, m)
    if bits is not None:
        _obs.check_quant(name, k, bits, group_size)
    _obs.check_damp(name, damp)
    _obs.check_finite(name, h)
    _obs.check_weights_finite(name, w)
    res = _obs.sweep(w, h, damp=float(damp), block_size=int(block_size), bits=bits,
                     symmetric=bool(symmetric), group_size=group_size, act_order=False,
                     sparsity=None if sparsity is None else float(sparsity), n=n, m=m)
    _obs.check_result(name, res, damp)
    return res.weights.astype(jnp.asarray(w).dtype), res.mask


def sparsegpt(
    params: Params,
    stats: Any,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    contracting: _layers.Contracting = None,
    model_map: Any = None,
    where: _select.Where = None,
) -> tuple[Params, Params]:
    """SparseGPT of every selected kernel -> ``(new params, mask tree)``.

    Args:
      params: a pytree of arrays.
      stats: per-kernel `LayerStats` (as for `gptq`).
      sparsity, n, m, bits, group_size, symmetric, damp, block_size: as in
        `sparsegpt_matrix` (N:M runs along the contraction); a ``where`` callable or mask
        may give a leaf its own `SparseGPTSettings` or a mapping of some of its fields.
      contracting: ``{leaf path string: contracting axes}``; default every axis but the last.
      model_map: a `jaxopt_lab.ModelMap`: each kernel's contracting axes are read from it
        (``contracting`` entries still win).
      where: leaf selection (default: float leaves with ``ndim >= 2``).

    Returns:
      ``(params, masks)``: the updated weights (pruned entries exactly zero; unselected
      leaves untouched) and a bool mask tree with ``params``' structure (True = kept,
      all True for unselected leaves), ready for ``apply_mask``/``prune``/``to_sparse``.

    Sharded kernels: a kernel sharded with ``NamedSharding`` along its output axes is
    swept where its shards live (``shard_map``, the Hessian replicated) and gives the
    single-device mask exactly, sharded like the kernel. N:M works column by column (the
    weights bit for bit too); unstructured sparsity ranks each block of rows across all
    outputs, done exactly across the shards by bisection on the scores (one ``psum`` of a
    count per step; ties by flat index as on one device), and its kept weights may differ
    from one device's by a few ulp (XLA may order the per-shard update differently: up to
    4 ulp measured on jax 0.12, none on jax 0.10). Sharding along a contracting axis raises
    (the sweep carries each row's error to every later row).

    Raises:
      ValueError: naming the leaf, for missing or empty statistics and the errors of
        `sparsegpt_matrix`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> from jaxopt_lab.oneshot import hessian_accumulate, hessian_init, sparsegpt
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> params = {"kernel": jax.random.normal(jax.random.key(1), (8, 4))}
      >>> stats = {"['kernel']": hessian_accumulate(hessian_init(8), x)}
      >>> new, masks = sparsegpt(params, stats, sparsity=0.5)
      >>> float(jol.sparsity(new).overall), int((~masks["kernel"]).sum())
      (0.5, 16)
    """
    base = _select.deferred_settings(  # bad arguments raise at the first leaf, naming it
        SparseGPTSettings, sparsity=sparsity, n=n, m=m, bits=bits, group_size=group_size,
        symmetric=symmetric, damp=damp, block_size=block_size)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    choices = _select.leaf_choices(params, where, model_map=model_map)
    new, masks = [], []
    for (path, leaf), (_, _, choice) in zip(flat, choices):
        if choice is False:
            new.append(leaf)
            masks.append(all_true_like(leaf))
            continue
        name = _select.path_str(path)
        s = _select.fields_of(_select.leaf_overrides(name, choice, base))
        placed = _sharded.placement(leaf)
        if placed is not None:  # a NamedSharding-sharded kernel: swept shard by shard
            w2, mask = _sharded.sparsegpt(name, path, leaf, stats, contracting, model_map,
                                          placed, s, check_pruning=check_pruning)
            new.append(w2)
            masks.append(mask)
            continue
        shape, axes, mat, st = _layers.kernel_matrix(name, path, leaf, stats, contracting,
                                                     model_map)
        w2, mask = sparsegpt_matrix(mat, st.xtx, name=name, **s)
        new.append(_layers.from_matrix(w2, shape, axes))
        masks.append(_layers.from_matrix(mask, shape, axes))
    return jax.tree.unflatten(treedef, new), jax.tree.unflatten(treedef, masks)
