"""Quantization-aware training: `fake_quant` (straight-through) and LSQ learned step sizes.

`fake_quant` returns exactly ``dequantize(quantize(x))`` (same settings) in the forward
pass; its derivative is the straight-through estimator: 1 where rounding, not clipping,
decided the value, 0 where the value was clipped. With the default min/max (absmax) scales
nothing is clipped, so the STE passes the gradient through unchanged.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) makes the step size ``s`` a
trainable parameter: ``v_hat = round(clip(v / s, -Q_N, Q_P)) * s`` with

* ``d v_hat / d v = 1`` if ``-Q_N < v / s < Q_P`` else 0;
* ``d v_hat / d s = round(v / s) - v / s`` inside, ``-Q_N`` below, ``Q_P`` above;
* the step's gradient multiplied by ``g = 1 / sqrt(N * Q_P)``, ``N`` the number of values
  sharing that step.

Signed codes use ``Q_N = 2**(b-1)``, ``Q_P = 2**(b-1) - 1``; unsigned ``Q_N = 0``,
``Q_P = 2**b - 1``. Steps are initialised as in the paper: ``2 * mean|v| / sqrt(Q_P)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_lab import _select
from jaxopt_lab.quant.affine import clamp_cast, divide, integer_range, round_half_away
from jaxopt_lab.quant.codes import compute_codes, grouped
from jaxopt_lab.quant.core import (
    SETTING_KEYS,
    check_settings,
    is_bare_array,
    leaf_settings,
    report_fallbacks,
)
from jaxopt_lab.quant.qtensor import is_qtensor
from jaxopt_lab.quant.settings import LSQSettings, QuantSettings

Params = Any


@functools.partial(jax.jit, static_argnames=SETTING_KEYS + ("group_axis",))
def fake_quantize_array(x: jax.Array, **settings: Any) -> tuple[jax.Array, jax.Array]:
    """``dequantize(quantize_array(x))`` without packing, and the not-clipped mask.

    The mask is True where ``x / s + z`` lies within half a step of ``[qmin, qmax]`` (fp8:
    of ``[-max, max]``): there rounding, not clipping, decided the value.
    """
    s = settings
    view, red = grouped(x.astype(jnp.float32), s)
    codes, scale, zero = compute_codes(view, red, s)
    ratio = divide(view, scale)
    if s["dtype"] is not None:
        info = jnp.finfo(s["dtype"])
        fmax = float(info.max)
        half_ulp = 2.0 ** (math.floor(math.log2(fmax)) - info.nmant - 1)  # at the top binade
        x_hat, mask = codes.astype(jnp.float32) * scale, jnp.abs(ratio) <= fmax + half_ulp
    else:
        qmin, qmax = integer_range(s["bits"], s["symmetric"])
        vals = codes.astype(jnp.float32)
        if zero is not None:
            vals, ratio = vals - zero.astype(jnp.float32), ratio + zero.astype(jnp.float32)
        x_hat = vals * scale
        mask = (ratio >= qmin - 0.5) & (ratio <= qmax + 0.5)
    return clamp_cast(x_hat.reshape(x.shape), x.dtype), mask.reshape(x.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _ste(x: jax.Array, settings: tuple) -> jax.Array:
    return fake_quantize_array(x, **dict(settings))[0]


@_ste.defjvp
def _ste_jvp(settings: tuple, primals, tangents):
    (x,), (t,) = primals, tangents
    y, mask = fake_quantize_array(x, **dict(settings))
    return y, jnp.where(mask, t, jnp.zeros_like(t))


def fake_quant(
    tree_or_array: Params,
    *,
    bits: int = 8,
    granularity: str = "channel",
    group_size: int | None = None,
    symmetric: bool = True,
    axis: int = -1,
    where: _select.Where = None,
    dtype: Any = None,
    scale_dtype: Any = "float32",
    model_map: Any = None,
) -> Params:
    """Quantize-dequantize with the straight-through estimator, for QAT inside a loss.

    Args:
      tree_or_array: one float array (always selected) or a pytree of arrays.
      bits, granularity, group_size, symmetric, axis, where, dtype, scale_dtype, model_map:
        as in `jaxopt_lab.quantize` (``where`` may return per-leaf overrides; the map gives
        each kernel its real channel and contraction axes).

    Returns:
      The same structure; selected leaves replaced by their fake-quantized values
      (same shape and dtype). Works under ``jit``, ``grad``, ``vmap`` and ``pmap``.

    Raises:
      ValueError: as `jaxopt_lab.quantize` (naming the leaf path).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> w = jnp.array([[0.3, -1.0], [0.26, 0.5]])
      >>> loss = lambda w: jnp.sum(jol.fake_quant(w, bits=2, granularity="tensor") ** 2)
      >>> jol.fake_quant(w, bits=2, granularity="tensor").tolist()
      [[0.0, -1.0], [0.0, 1.0]]
      >>> jax.grad(loss)(w).tolist()  # STE: d/dw of sum(w_hat**2) is 2 * w_hat
      [[0.0, -2.0], [0.0, 2.0]]
    """
    base = check_settings("fake_quant", dict(
        bits=bits, granularity=granularity, group_size=group_size, symmetric=symmetric,
        axis=axis, dtype=dtype, scale_dtype=scale_dtype))
    bare = is_bare_array(tree_or_array)
    if where is None and bare:
        where = True
    fallbacks: list[str] | None = None if bare else []

    def one(path, leaf, choice):
        if is_qtensor(leaf):
            return leaf
        info = None if model_map is None else model_map.lookup(path)
        s = leaf_settings(_select.path_str(path), leaf, base, choice, info, fallbacks)
        return _ste(jnp.asarray(leaf), tuple(sorted(s.items())))

    out = _select.map_selected(one, tree_or_array, where, is_leaf=is_qtensor,
                               model_map=model_map)
    report_fallbacks(fallbacks or [], "fake_quant")
    return out


# --- LSQ -------------------------------------------------------------------------------


def lsq_bounds(bits: int, signed: bool = True) -> tuple[int, int]:
    """``(Q_N, Q_P)`` of LSQ: the code range is ``[-Q_N, Q_P]``."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lsq(v: jax.Array, s: jax.Array, bounds: tuple[int, int], grad_scale: float) -> jax.Array:
    return _lsq_fwd(v, s, bounds, grad_scale)[0]


def _lsq_fwd(v, s, bounds, grad_scale):
    qn, qp = bounds
    ratio = divide(v.astype(jnp.float32), s)
    codes = round_half_away(jnp.clip(ratio, -qn, qp))
    # A step <= 0 has no meaning: make it visible as NaN rather than a silent wrong value.
    # The top level may lie beyond a float16/bfloat16 leaf's range: clamp rather than inf
    # (the backward pass keeps the LSQ gradients of the unclamped level).
    out = clamp_cast(jnp.where(s > 0, codes * s, jnp.nan), v.dtype)
    return out, (ratio, codes, s)


def _lsq_bwd(bounds, grad_scale, res, g):
    qn, qp = bounds
    ratio, codes, s = res
    dtype, g = g.dtype, g.astype(jnp.float32)
    inside = (ratio > -qn) & (ratio < qp)
    dv = jnp.where(inside, g, 0.0)
    ds = g * jnp.where(inside, codes - ratio, jnp.where(ratio <= -qn, -float(qn), float(qp)))
    reduce = tuple(i for i, (a, b) in enumerate(zip(s.shape, ratio.shape)) if a == 1 and b != 1)
    ds = jnp.sum(ds, axis=reduce, keepdims=True) * grad_scale
    return dv.astype(dtype), ds.astype(s.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_init(
    params: Params,
    *,
    bits: int = 8,
    granularity: str = "tensor",
    axis: int = -1,
    signed: bool = True,
    where: _select.Where = None,
) -> Params:
    """Initial LSQ step sizes: ``2 * mean|v| / sqrt(Q_P)`` per tensor or per channel.

    Args:
      params: the pytree to be quantized.
      bits: code width (2, 3, 4 or 8).
      granularity: ``"tensor"`` (one step) or ``"channel"`` (one step per index of ``axis``).
      axis: channel axis for ``granularity="channel"``.
      signed: signed codes (weights) or unsigned (non-negative activations).
      where: leaf selection; may give a leaf its own `jaxopt_lab.LSQSettings` or a mapping
        of some of its fields (``bits``/``signed``/``granularity``/``axis``). Pass the
        same ``where`` to `lsq_fake_quant`.

    Returns:
      A tree with the structure of ``params``: float32 steps with the leaf's ``ndim``
      (size 1 on reduced axes, so they broadcast) at selected leaves, ``None`` elsewhere.
      Train it alongside the params (for example ``{"params": p, "steps": s}``).

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> steps = jol.lsq_init({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, bits=4)
      >>> steps["w"].shape, steps["b"], round(float(steps["w"][0, 0]), 4)
      ((1, 1), None, 0.7559)
    """
    base = _select.settings("lsq_init", LSQSettings, bits=bits, granularity=granularity,
                            axis=axis, signed=signed)

    def one(path, leaf, choice):
        name = _select.path_str(path)
        s = _select.leaf_overrides(name, choice, base)
        qs = leaf_settings(name, leaf, QuantSettings(bits=s.bits, granularity=s.granularity,
                                                     axis=s.axis), True)
        if qs["granularity"] == "group":
            raise ValueError(f"{name}: LSQ steps are per tensor or per channel, not per group")
        x = jnp.abs(jnp.asarray(leaf, jnp.float32))
        red = tuple(i for i in range(x.ndim) if qs["axis"] is None or i not in qs["axis"])
        # A float32 sum of huge values overflows: average big leaves in units of 2**64 (a
        # power of two, so exact), then clamp the step itself into the float32 range.
        unit = jnp.where(jnp.max(x, axis=red, keepdims=True) > 2.0**64, 2.0**64, 1.0)
        mean = jnp.mean(x * (1.0 / unit), axis=red, keepdims=True)
        qp = lsq_bounds(s.bits, s.signed)[1]
        step = jnp.minimum(2 * mean / math.sqrt(qp) * unit, jnp.finfo(jnp.float32).max)
        return jnp.where(step == 0, 1.0, step)  # all zeros: 1; traced NaN stays NaN

    chosen = _select.map_selected(one, params, where)
    keep = _select.selection(params, where)
    return jax.tree.map(lambda c, x: x if c else None, keep, chosen)


def lsq_fake_quant(
    params: Params, steps: Params, *, bits: int = 8, signed: bool = True,
    where: _select.Where = None,
) -> Params:
    """LSQ fake quantization of every leaf of ``params`` that has a step in ``steps``.

    Args:
      params: the float pytree.
      steps: from `lsq_init` (``None`` where a leaf is not quantized); trainable.
      bits, signed: as in `lsq_init`.
      where: the ``where`` given to `lsq_init`, for its per-leaf ``bits``/``signed``.

    Returns:
      ``params`` with stepped leaves replaced by ``round(clip(v / s, -Q_N, Q_P)) * s``;
      differentiable in both ``params`` (STE) and ``steps`` (LSQ gradient, scaled by
      ``1 / sqrt(N * Q_P)``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> p = {"w": jnp.array([[0.1, -0.7], [0.35, 2.0]])}
      >>> s = {"w": jnp.full((1, 1), 0.25)}
      >>> jol.lsq_fake_quant(p, s, bits=3)["w"].tolist()
      [[0.0, -0.75], [0.25, 0.75]]
    """
    base = _select.settings("lsq_fake_quant", LSQSettings, bits=bits, signed=signed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    choices = ([c for _, _, c in _select.leaf_choices(params, where)] if where is not None
               else [True] * len(flat))
    out = []
    for (path, leaf), step, choice in zip(flat, treedef.flatten_up_to(steps), choices):
        if step is None:
            out.append(leaf)
            continue
        name = _select.path_str(path)
        s = _select.leaf_overrides(name, choice, base)
        step = jnp.asarray(step)
        if step.ndim != jnp.ndim(leaf):
            raise ValueError(f"{name}: step of shape {step.shape} does not broadcast like a "
                             f"leaf of shape {jnp.shape(leaf)}; make steps with lsq_init")
        bounds = lsq_bounds(s.bits, s.signed)
        n = max(1, math.prod(jnp.shape(leaf)) // max(1, step.size))
        out.append(_lsq(jnp.asarray(leaf), step, bounds, 1.0 / math.sqrt(n * bounds[1])))
    return jax.tree.unflatten(treedef, out)
