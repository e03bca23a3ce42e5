"""GPTQ (Frantar et al. 2022): second-order weight quantization to ordinary `QTensor` s.

Each row ``k`` of a ``(K, N)`` kernel (one input channel) is rounded in turn and its
rounding error is compensated on the rows not yet rounded through the inverse Hessian of
the layer's reconstruction loss ``||X W - X W_q||^2`` (``H = X^T X``); Algorithm 1 with the
Cholesky factor of ``H^-1``, dampening, lazy block updates and optional activation order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab import _select
from jaxopt_lab.oneshot import _layers, _obs, _sharded
from jaxopt_lab.oneshot.settings import GPTQSettings
from jaxopt_lab.quant.qtensor import QTensor, pack

Params = Any


def _qtensor(res: _obs.SweepResult, shape: tuple[int, ...], axes: tuple[int, ...], bits: int,
             group_size: int | None, dtype: Any, name: str) -> QTensor:
    """Wraps the sweep's codes in a `QTensor` of the kernel's own shape and layout."""
    k, ncol = res.codes.shape
    nd = len(shape)
    out_shape = tuple(shape[i] for i in range(nd) if i not in axes)
    leading = axes == tuple(range(len(axes)))
    if leading and group_size is None:
        # Leading contracting axes: one scale per real output element.
        meta = dict(granularity="channel", axis=tuple(range(len(axes), nd)))
        scale = res.scale.reshape(out_shape)
        zero = None if res.zero is None else res.zero.reshape(out_shape)
    elif leading:
        g = group_size or k
        meta = dict(granularity="group", group_axis=axes, group_size=g)
        scale = res.scale.reshape((k // g,) + out_shape)
        zero = None if res.zero is None else res.zero.reshape((k // g,) + out_shape)
    else:
        raise ValueError(
            f"{name}: a kernel of shape {shape} contracting over axes {axes} has no QTensor "
            "layout: its contracting axes must lead (transpose the kernel, or use quantize)")
    codes = res.codes.reshape(shape)
    return QTensor(pack(codes, bits), scale, zero, bits=bits, shape=shape, dtype=dtype, **meta)


def gptq_matrix(
    w: jax.typing.ArrayLike,
    h: jax.typing.ArrayLike,
    *,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "weight",
) -> QTensor:
    """GPTQ of one ``(K, N)`` matrix with Hessian ``h = X^T X`` (``(K, K)``).

    Args:
      w: float weights, Flax layout (rows = the ``K`` contracted inputs).
      h: ``X^T X`` of the calibration inputs (`hessian_accumulate`'s ``xtx``).
      bits: 2, 3, 4 or 8.
      group_size: ``None`` for one scale per output column, else ``g`` consecutive rows
        share a scale (``K % g == 0``); scales ``(K // g, N)``.
      symmetric: symmetric codes (zero point 0) or asymmetric with an ``int8`` zero point,
        exactly as `jaxopt_lab.quantize`.
      act_order: process rows by decreasing ``H[k, k]``; group scales are then fixed from
        the original weights ("static groups") so the result is an ordinary `QTensor`.
        Without it, a group's scale is set from the error-updated rows when the sweep
        reaches the group, as in the paper.
      static_groups: fix every group's scale from the original weights also without
        ``act_order``. Dynamic scales follow the error-compensated rows, which can grow:
        with tiny groups (4 rows) that was seen to cost more than round-to-nearest on the
        calibration inputs; static scales never did in the tests' sweeps.
      clip_search: choose each group's range (per output) by the reference code's grid
        search (its ``mse=True``): the min-max range shrunk by the factor in 1, 0.99, ...,
        0.21 with the least ``sum |w_hat - w|^2.4``; values beyond it are clipped. It helps
        most at 2-3 bits.
      damp: dampening relative to the mean diagonal of ``H``; ``inf`` is round-to-nearest.
      block_size: rows per lazy batch update (rounded to a multiple of ``group_size``).
      name: what error messages call the layer.

    Returns:
      A `QTensor` of shape ``(K, N)``: ``int8`` codes for 8 bits, else packed along ``N``.

    Raises:
      ValueError: naming ``name``, for non-float weights, bad shapes, bits, a group size
        that does not divide ``K``, a negative ``damp``, or (for concrete input) weights or
        a Hessian with NaN/Inf, a Hessian that is not positive definite after dampening,
        or a result beyond float32's range (weights near its limit).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> from jaxopt_lab.oneshot import gptq_matrix
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 4))
      >>> qt = gptq_matrix(w, x.T @ x, bits=4, group_size=4)
      >>> qt.shape, qt.scale.shape
      ((8, 4), (2, 4))
      >>> err = lambda v: float(jnp.linalg.norm(x @ (w - v)))
      >>> rtn = jol.dequantize(jol.quantize(w, bits=4, granularity="group", group_size=4))
      >>> err(qt.dequantize()) <= err(rtn)
      True
    """
    k, _ = _obs.check_matrix(name, w, h)
    _obs.check_quant(name, k, bits, group_size)
    _obs.check_damp(name, damp)
    _obs.check_finite(name, h)
    _obs.check_weights_finite(name, w)
    dtype = jnp.asarray(w).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        # quantize rejects non-float leaves too; a QTensor of logical dtype int32 is nonsense.
        raise ValueError(f"{name}: weights must be floating point, got dtype {dtype}")
    res = _obs.sweep(w, h, damp=float(damp), block_size=int(block_size), bits=int(bits),
                     symmetric=bool(symmetric), group_size=group_size, act_order=bool(act_order),
                     sparsity=None, n=None, m=None, static_groups=bool(static_groups),
                     clip_search=bool(clip_search))
    _obs.check_result(name, res, damp)
    return _qtensor(res, tuple(np.shape(w)), (0,), int(bits), group_size, dtype, name)


def gptq(
    params: Params,
    stats: Any,
    *,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    contracting: _layers.Contracting = None,
    model_map: Any = None,
    where: _select.Where = None,
) -> Params:
    """GPTQ of every selected kernel of ``params`` -> the tree with `QTensor` leaves.

    Args:
      params: a pytree of arrays.
      stats: per-kernel `LayerStats`: a dict ``{leaf path string: LayerStats}`` or a tree
        shaped like ``params`` holding a `LayerStats` at (or above) each selected kernel.
      bits, group_size, symmetric, act_order, static_groups, clip_search, damp, block_size:
        as in `gptq_matrix`; a ``where`` callable or mask may give a leaf its own
        `GPTQSettings` (e.g. ``GPTQSettings(bits=8)``) or a mapping of some of its fields
        (``{"bits": 8}``).
      contracting: ``{leaf path string: contracting axes}``; default every axis but the
        last (Flax ``Dense``/``Conv``). The ``QTensor`` keeps the kernel's own shape.
      model_map: a `jaxopt_lab.ModelMap`: each kernel's contracting axes are read from it
        (``contracting`` entries still win), and the default selection is its kernels.
      where: leaf selection (default: the map's kernels, else float leaves with
        ``ndim >= 2``).

    Returns:
      ``params`` with the selected kernels as `QTensor` (usable with ``dequantize``,
      ``save``, ``quantized_apply``); other leaves untouched.

    Sharded kernels: a kernel sharded with ``NamedSharding`` along its output axes is
    swept where its shards live (``shard_map``, the Hessian replicated; only its largest
    magnitude is reduced across shards) and gives the single-device `QTensor` bit for
    bit, its codes sharded like the kernel and its scales along the output axes. Sharding
    along a contracting axis raises (the sweep carries each row's error to every later
    row), as do shards of the last axis not a multiple of the codes per packed word (2 at
    4 bits). Inside a caller's ``jax.jit`` leaves have no concrete sharding and take the
    single-device path.

    Raises:
      ValueError: naming the leaf, for missing or empty statistics, NaN in a Hessian, and
        the errors of `gptq_matrix`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt_lab.oneshot import gptq, hessian_accumulate, hessian_init
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
      >>> stats = {"['dense']['kernel']": hessian_accumulate(hessian_init(8), x)}
      >>> q = gptq(params, stats, bits=8)
      >>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"].shape
      ('QTensor', (4,))
    """
    # Bad keyword arguments raise at the first selected leaf, naming it.
    base = _select.deferred_settings(
        GPTQSettings, bits=bits, group_size=group_size, symmetric=symmetric,
        act_order=act_order, static_groups=static_groups, clip_search=clip_search, damp=damp,
        block_size=block_size)

    def one(name, path, leaf, choice):
        s = _select.leaf_overrides(name, choice, base)
        placed = _sharded.placement(leaf)
        if placed is not None:  # a NamedSharding-sharded kernel: swept shard by shard
            return _sharded.gptq(name, path, leaf, stats, contracting, model_map, placed,
                                 _select.fields_of(s))
        shape, axes, mat, st = _layers.kernel_matrix(name, path, leaf, stats, contracting,
                                                     model_map)
        _obs.check_quant(name, mat.shape[0], s.bits, s.group_size)
        qt = gptq_matrix(mat, st.xtx, name=name, **_select.fields_of(s))
        if axes == tuple(range(len(axes))):
            return _qtensor(_as_result(qt), shape, axes, s.bits, s.group_size,
                            jnp.asarray(leaf).dtype, name)
        raise ValueError(f"{name}: GPTQ to a QTensor needs leading contracting axes, got "
                         f"{axes} for shape {shape}")

    return _layers.map_kernels(one, params, where, model_map)


def _as_result(qt: QTensor) -> _obs.SweepResult:
    """The codes/scales of a 2-D `QTensor` from `gptq_matrix` in the sweep's layout."""
    k, ncol = qt.shape
    codes = qt.values()
    g = qt.group_size if qt.granularity == "group" else k
    scale = jnp.asarray(qt.scale).reshape(k // g, ncol)
    zero = None if qt.zero_point is None else jnp.asarray(qt.zero_point).reshape(k // g, ncol)
    return _obs.SweepResult(None, codes, scale, zero, None)
