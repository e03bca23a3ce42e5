"""`quantize` / `dequantize`: affine integer (2, 3, 4, 8 bits) and fp8 weight quantization.

Numerics (docs/design.md): ``q = clip(round(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``.

* Symmetric (default): ``z = 0``, codes in ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (the
  restricted range, so ``-x`` quantizes to ``-q``), ``s = max|x| / qmax``.
* Asymmetric: codes in ``[-2**(b-1), 2**(b-1) - 1]``, the range ``[min(x, 0), max(x, 0)]``
  so zero is always exactly representable, ``z`` an ``int8`` zero point.
* An all-zero slice gets ``s = 1``; a slice whose scale would underflow gets the smallest
  normal float32, so scales are always positive and finite for finite input. NaN/Inf in
  traced input propagate into the scale, so they show up in `dequantize`, never hidden.
* ``round`` rounds half away from zero (`round_half_away`); asymmetric range ends are
  pinned to ``qmin``/``qmax``, so quantize(dequantize(q)) reproduces the codes.
* ``x / s`` is a true division (`affine.divide`), exact for scales up to float32's max; a
  level beyond the output dtype's finite range (float16 near 65504, or float32 itself) is
  clamped to that range, so finite input never dequantizes to inf.
* fp8 (``dtype="float8_e4m3fn"|"float8_e5m2"``): ``s = max|x| / finfo(dtype).max`` and the
  codes are ``(x / s)`` cast to that format.

Granularity: ``"tensor"`` (one scale), ``"channel"`` (one scale per index of ``axis``; the
last axis of a Flax kernel is its output features) or ``"group"`` (``group_size``
consecutive elements along the *contraction axis* share a scale, one scale per group and per
index of every other axis). The contraction axis is the axis just before ``axis`` (for a
Flax Dense ``(in, out)`` or Conv ``(kh, kw, in, out)`` kernel with ``axis=-1``: the input
features); when ``axis`` resolves to 0 it is axis 1, and for a 1-D array it is axis 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab import _select
from jaxopt_lab._select import LayoutFallbackWarning, report_fallbacks  # noqa: F401
from jaxopt_lab.quant.codes import compute_codes, grouped
from jaxopt_lab.quant.qtensor import QTensor, is_qtensor, pack
from jaxopt_lab.quant.settings import SCALE_DTYPES, QuantSettings  # noqa: F401

Params = Any
# The fields of `QuantSettings`: the static arguments of the jitted kernels.
SETTING_KEYS = tuple(f.name for f in dataclasses.fields(QuantSettings))


def check_settings(where: str, s: Mapping[str, Any]) -> QuantSettings:
    """The `QuantSettings` of a mapping; errors start with ``where`` (their origin)."""
    return _select.settings(where, QuantSettings, **s)


def _as_axes(axis: Any) -> tuple[int, ...]:
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def _shape_rule_layout(shape: tuple[int, ...], axis: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channel axes, group axes) by the documented shape rule (no model map)."""
    ndim = len(shape)
    channel = tuple(sorted(int(a) % ndim for a in _as_axes(axis)))
    if ndim == 1:
        return channel, (0,)
    a = channel[0]
    return channel, ((a - 1,) if a > 0 else (1,))


def _map_layout(info: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(channel axes, group axes) read from the model map, or None when it has none."""
    if info is None or info.role not in ("kernel", "embedding") or not info.contracting:
        return None
    return tuple(sorted(info.outputs + info.batch)), tuple(info.contracting)


def leaf_settings(path: str, leaf: Any, base: QuantSettings | Mapping[str, Any], choice: Any,
                  info: Any = None, fallbacks: list[str] | None = None) -> dict[str, Any]:
    """The leaf's `QuantSettings` (``base`` or its `where` choice), layout resolved.

    ``base`` is the call's record (a mapping of all its fields is read as one). The
    leaf's record comes from `jaxopt_lab._select.leaf_overrides`; the fields it sets
    explicitly (a mapping's keys, or a record's fields that differ from ``base``) win
    over the model map and never fall back.

    The channel axes (``axis``, a tuple) and the group axes (``group_axis``, a tuple of
    contiguous axes) come from ``info`` (the leaf's `jaxopt_lab.LeafInfo` in a model map:
    one scale per real output element, groups along the real contraction) unless the
    leaf's overrides name an ``axis``; without a map the shape rule of the module
    docstring applies. When the requested layout does not fit the leaf (group size not
    dividing the contraction, contraction axes not contiguous) and it was not an explicit
    per-leaf override, the leaf falls back to ``granularity="channel"`` and a line naming
    ``path`` is appended to ``fallbacks``.

    Returns:
      The record's fields as the static keyword arguments of `quantize_array`, with
      ``axis`` / ``group_axis`` resolved to tuples of non-negative ints (``None`` where
      unused).

    Raises:
      ValueError: naming ``path`` for any bad value.
    """
    if not isinstance(base, QuantSettings):
        base = check_settings(path, base)
    record = _select.leaf_overrides(path, choice, base)
    explicit = _select.overridden(choice, base, record)
    s = {k: getattr(record, k) for k in SETTING_KEYS}
    dtype = getattr(leaf, "dtype", None)
    if not _select.is_float_array(leaf):
        raise ValueError(f"{path}: only floating-point arrays can be quantized, got "
                         f"{type(leaf).__name__} with dtype {dtype}")
    shape = tuple(np.shape(leaf))
    if int(np.prod(shape)) == 0:
        raise ValueError(f"{path}: cannot quantize an empty array of shape {shape}")
    if not isinstance(leaf, jax.core.Tracer) and not np.isfinite(np.asarray(leaf)).all():
        raise ValueError(f"{path}: cannot quantize an array containing NaN or Inf")
    ndim, gran = len(shape), s["granularity"]
    s["group_axis"] = None
    if gran == "tensor":
        s["axis"] = None
        return s
    if ndim == 0:
        raise ValueError(f"{path}: granularity={gran!r} needs ndim >= 1, got a scalar")
    axes = _as_axes(s["axis"])
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"{path}: axis {s['axis']} out of range for shape {shape}")
    mapped = None if "axis" in explicit else _map_layout(info)
    channel, group = mapped if mapped else _shape_rule_layout(shape, s["axis"])
    s["axis"] = channel
    if gran == "channel":
        return s
    n = int(np.prod([shape[a] for a in group]))
    contiguous = group == tuple(range(group[0], group[-1] + 1))
    if contiguous and n % s["group_size"] == 0:
        s["axis"], s["group_axis"] = None, group
        return s
    why = (f"contraction axes {group} are not contiguous" if not contiguous else
           f"group_size {s['group_size']} does not divide the contraction of length {n} "
           f"(axes {group} of shape {shape})")
    if "granularity" in explicit or "group_size" in explicit or fallbacks is None:
        raise ValueError(f"{path}: {why}")
    fallbacks.append(f"{path}: {why}; quantized per channel (axes {channel}) instead")
    s["granularity"] = "channel"
    return s


def _stored(param: jax.Array, shape: tuple[int, ...], s: Mapping[str, Any]) -> jax.Array:
    """Scale/zero point from the keepdims grouped form to the QTensor layout."""
    if s["granularity"] == "tensor":
        return param.reshape(())
    if s["granularity"] == "channel":
        return param.reshape(tuple(shape[a] for a in s["axis"]))
    return jnp.squeeze(param, s["group_axis"][0] + 1)


@functools.partial(jax.jit, static_argnames=SETTING_KEYS + ("group_axis",))
def quantize_array(x: jax.typing.ArrayLike, **settings: Any) -> QTensor:
    """Quantizes one float array with settings checked by `leaf_settings`.

    Jitted (settings static), so eager calls compile once per shape and settings.
    """
    s = settings
    x = jnp.asarray(x)
    shape = x.shape
    view, red = grouped(x.astype(jnp.float32), s)
    codes, scale, zero = compute_codes(view, red, s)
    meta = dict(shape=shape, dtype=x.dtype, granularity=s["granularity"], axis=s["axis"],
                group_axis=s["group_axis"],
                group_size=None if s["group_axis"] is None else s["group_size"])
    codes = codes.reshape(shape or (1,))
    scale = _stored(scale, shape, s).astype(s["scale_dtype"])  # exact: rounded in _codes
    if s["dtype"] is not None:
        fp8 = jnp.dtype(s["dtype"]).name
        return QTensor(codes, scale, None, bits=8, fp8=fp8, **meta)
    zero = None if zero is None else _stored(zero, shape, s)
    return QTensor(pack(codes, s["bits"]), scale, zero, bits=s["bits"], **meta)


def is_bare_array(tree: Any) -> bool:
    return hasattr(tree, "shape") and hasattr(tree, "dtype") and not is_qtensor(tree)


def quantize(
    tree: Params,
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
    """Replaces the selected float leaves of ``tree`` by `QTensor` s.

    Args:
      tree: any pytree of arrays (Flax params, ``nnx.State``, dicts...), or one array
        (a bare array is always selected).
      bits: 2, 3, 4 or 8; 2, 3 and 4 bits are packed into ``uint8``.
      granularity: ``"tensor"``, ``"channel"`` (one scale per index of ``axis``) or
        ``"group"`` (``group_size`` elements along the contraction axis share a scale; see
        the module docstring).
      group_size: elements per group for ``granularity="group"``.
      symmetric: zero point 0 (default) or an ``int8`` zero point with the full range.
      axis: the channel axis or axes (default -1: a Flax kernel's output features); only
        used without a model map, or as a per-leaf override.
      where: leaf selection (see `jaxopt_lab.select`); default: the kernels of
        ``model_map``, or without a map float leaves with ``ndim >= 2``. A callable/mask
        may give a leaf its own `jaxopt_lab.QuantSettings` (e.g.
        ``QuantSettings(bits=8)`` for the first layer: mixed precision) or a mapping of
        some of its fields (``{"bits": 8}``) replacing the keyword arguments here.
      dtype: ``"float8_e4m3fn"`` or ``"float8_e5m2"`` for fp8 codes instead of integers.
      scale_dtype: ``"float32"`` (default) or ``"bfloat16"`` storage for the scales; bfloat16
        scales are rounded *up* before the codes are computed (nothing extra clips) and save
        2 bytes per scale (int4 with 128-element groups: 7.5x -> 7.75x smaller than fp32).
      model_map: a `jaxopt_lab.ModelMap` of the model (`jaxopt_lab.model_map`): each
        kernel gets one scale per real output element (``heads x head_dim`` for an
        attention query kernel) and groups along its real contraction axes (flattened when
        there are several, e.g. a conv's ``kh x kw x in``); biases, norms and embeddings
        are left float by default (select an embedding explicitly to quantize it, one
        scale per row).

    Returns:
      ``tree`` with selected leaves replaced by `QTensor`; other leaves untouched.
      Existing `QTensor` leaves are left as they are. A leaf whose contraction the group
      size does not divide (a first conv with 1 or 3 input channels) is quantized per
      channel instead and named in one `LayoutFallbackWarning`.

    Raises:
      ValueError: naming the leaf path, for unsupported bits/granularity/dtype, a group
        size given as a per-leaf override that does not divide the contraction, a
        selected leaf that is not a non-empty float array, or a concrete leaf holding
        NaN/Inf.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> params = {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.zeros(4)}
      >>> q = jol.quantize(params, bits=8)
      >>> type(q["kernel"]).__name__, q["kernel"].qvalue.dtype, q["bias"] is params["bias"]
      ('QTensor', dtype('int8'), True)
      >>> float(jnp.abs(jol.dequantize(q)["kernel"] - params["kernel"]).max()) < 0.05
      True
    """
    base = _select.settings("quantize", QuantSettings, bits=bits, granularity=granularity,
                            group_size=group_size, symmetric=symmetric, axis=axis, dtype=dtype,
                            scale_dtype=scale_dtype)
    bare = is_bare_array(tree)
    if where is None and bare:
        where = True
    fallbacks: list[str] | None = None if bare else []  # one array: the caller's layout

    from jaxopt_lab.quant import eager  # imports this module

    # Concrete small leaves wait for one batched program (compiled once for any shapes,
    # quant/eager.py); traced, sharded or large ones compile their own program per shape.
    pending: list[tuple[Any, dict[str, Any]]] = []

    def one(path, leaf, choice):
        if is_qtensor(leaf):
            return leaf
        name = _select.path_str(path)
        info = None if model_map is None else model_map.lookup(path)
        s = leaf_settings(name, leaf, base, choice, info, fallbacks)
        if eager.batchable(leaf):
            pending.append((leaf, s))
            return eager.Slot(len(pending) - 1)
        return quantize_array(leaf, **s)

    out = _select.map_selected(one, tree, where, is_leaf=is_qtensor, model_map=model_map)
    if pending:
        out = eager.fill(out, eager.quantize_leaves(pending), is_qtensor)
    report_fallbacks(fallbacks or [], "quantize")
    return out


def dequantize(tree: Params, *, dtype: Any = None) -> Params:
    """Expands every `QTensor` in ``tree`` back to a float array of its original shape.

    Args:
      tree: a pytree (or a single `QTensor`); non-QTensor leaves pass through.
      dtype: output dtype; default each tensor's original dtype.

    Returns:
      The tree with `QTensor` leaves replaced by ``(q - zero_point) * scale``.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> w = jnp.array([[0.0, 1.0], [-2.0, 0.5]])
      >>> jol.dequantize(jol.quantize(w, bits=8, granularity="tensor")).tolist()[1][0]
      -2.0
    """
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_qtensor(x) else x, tree,
                        is_leaf=is_qtensor)
