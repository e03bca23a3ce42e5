"""Integer matmul and convolution: int8 x int8 -> int32 accumulation, then float rescaling.

``x ~ (q_x - z_x) * s_x`` and ``w ~ q_w * s_w`` give
``sum_k x_k w_k ~ s_x * s_w * (sum_k q_x q_w - z_x * sum_k q_w)``: the contraction runs on
integers (``preferred_element_type=int32``; exact while the contraction length stays below
``2**31 / 128**2 ~ 131k``) and the scales are applied once to the result. Scales may vary
along any axis that is *not* contracted -- per token (rows of the activations), per output
channel of the weights -- never along a contracted axis.

Every scale and zero point is given in *keepdims* form: either a scalar, or an array with
its operand's rank whose contracted axes have size 1 (what ``jnp.max(..., keepdims=True)``
returns).

Examples:
  >>> import jax.numpy as jnp, jaxopt_lab as jol
  >>> x = jnp.array([[0.5, -1.0], [2.0, 0.25]])
  >>> w = jnp.array([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
  >>> qx, sx = jol.quantize_activations(x, reduce_axes=(1,))  # per-token scales
  >>> qw = jol.quantize(w, bits=8, granularity="channel")      # per-output-channel
  >>> y = jol.int8_dot_general(qx, qw.qvalue, (((1,), (0,)), ((), ())),
  ...                          lhs_scale=sx, rhs_scale=qw.scale[None, :])
  >>> bool(jnp.allclose(y, x @ w, atol=0.05))
  True
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_lab.quant.affine import affine_params, integer_range
from jaxopt_lab.quant.native import (
    float_int8_matmul,
    int8_conv_codes,
    int8_matmul,
    native_int8_available,
    xla_int8_dot_general,
)

ArrayLike = jax.typing.ArrayLike
PADDING_NAMES = ("SAME", "SAME_LOWER", "VALID")
DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def quantize_with(
    x: ArrayLike, scale: ArrayLike, zero_point: ArrayLike | None = None
) -> jax.Array:
    """``int8`` codes ``clip(round(x / scale) + zero_point)`` for a known (static) scale.

    Symmetric codes (``zero_point=None``) use ``[-127, 127]``; asymmetric ``[-128, 127]``.
    NaN in ``x`` gives an arbitrary code: keep NaN visible through the scale instead.
    """
    symmetric = zero_point is None
    qmin, qmax = integer_range(8, symmetric)
    # Multiplying by the reciprocal (not dividing) keeps this cheap on the hot path; a
    # one-ulp difference only moves exact ties, which the error bound s/2 already allows.
    q = jnp.round(jnp.asarray(x, jnp.float32) * (1.0 / jnp.asarray(scale, jnp.float32)))
    if not symmetric:
        q = q + jnp.asarray(zero_point, jnp.float32)
    return jnp.clip(q, qmin, qmax).astype(jnp.int8)


def quantize_activations(
    x: ArrayLike, *, reduce_axes: Sequence[int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """Dynamic symmetric int8 quantization: one scale per slice over ``reduce_axes``.

    Args:
      x: float activations.
      reduce_axes: axes sharing a scale (the contracted axes for per-token scales);
        ``None`` for a single per-tensor scale.

    Returns:
      ``(codes, scale)``: ``int8`` codes of ``x``'s shape and a float32 keepdims scale
      (scalar when ``reduce_axes`` is ``None``). An all-zero slice gets scale 1; NaN/Inf in
      a slice make that slice's scale NaN/Inf, so it shows in the output.
    """
    x = jnp.asarray(x, jnp.float32)
    keep = reduce_axes is not None
    amax = jnp.max(jnp.abs(x), axis=None if not keep else tuple(reduce_axes), keepdims=keep)
    scale, _ = affine_params(-amax, amax, bits=8, symmetric=True)
    return quantize_with(x, scale), scale


def _check_int8(name: str, x: ArrayLike) -> jax.Array:
    dtype = getattr(x, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.int8:
        raise TypeError(f"{name} must be an int8 array, got {type(x).__name__} of dtype {dtype}")
    return jnp.asarray(x)


def _keepdims(name: str, t: ArrayLike | None, operand: jax.Array,
              contracted: Sequence[int]) -> jax.Array | None:
    """Checks a scale/zero point is scalar or keepdims-shaped against ``operand``."""
    if t is None:
        return None
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    ok = t.ndim == operand.ndim and all(
        d == 1 if i in contracted else d in (1, operand.shape[i]) for i, d in enumerate(t.shape))
    if not ok:
        raise ValueError(f"{name} of shape {t.shape} must be a scalar or keepdims-shaped for "
                         f"an operand of shape {operand.shape} with size 1 on the contracted "
                         f"axes {tuple(contracted)}")
    return t


def _to_output(t: jax.Array, *groups: Sequence[int] | int) -> jax.Array:
    """Lays a keepdims array out along the output axes.

    Each group is either a tuple of ``t``'s axes (kept, in that order) or a count of
    size-1 output axes to insert; ``t``'s remaining axes must have size 1 and are dropped.
    """
    if t.ndim == 0:
        return t
    axes = [a for g in groups if not isinstance(g, int) for a in g]
    shape: list[int] = []
    for g in groups:
        shape += [1] * g if isinstance(g, int) else [t.shape[a] for a in g]
    rest = tuple(i for i in range(t.ndim) if i not in axes)
    return jnp.transpose(t, tuple(axes) + rest).reshape(shape)


def _axes(name: str, axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Non-negative axes; an axis outside ``[-ndim, ndim)`` is an error, not wrapped around."""
    out = []
    for a in axes:
        a = operator.index(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"{name} axis {a} is out of range for an operand of rank {ndim}")
        out.append(a % ndim)
    return tuple(out)


def _as_matrices(lhs, rhs, lc, rc) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """A contraction without batch axes as ``(M, K) @ (K, N)``: both matrices, and the
    shape (lhs free axes, then rhs free axes) to give their product."""
    l_free = tuple(i for i in range(lhs.ndim) if i not in lc)
    r_free = tuple(i for i in range(rhs.ndim) if i not in rc)
    k = math.prod(lhs.shape[i] for i in lc)
    a = jnp.transpose(lhs, l_free + lc).reshape(-1, k)
    b = jnp.transpose(rhs, rc + r_free).reshape(k, -1)
    return a, b, tuple(lhs.shape[i] for i in l_free) + tuple(rhs.shape[i] for i in r_free)


def _integer_contraction(lhs, rhs, lc, rc, lb, rb) -> jax.Array:
    """Exact int32 ``dot_general``; without batch axes, a 2-D `int8_matmul` (native on CPU)."""
    if lb:
        return xla_int8_dot_general(lhs, rhs, ((lc, rc), (lb, rb)))
    a, b, out_shape = _as_matrices(lhs, rhs, lc, rc)
    return int8_matmul(a, b).reshape(out_shape)


def int8_dot_general(
    lhs: ArrayLike,
    rhs: ArrayLike,
    dimension_numbers: DimensionNumbers,
    *,
    lhs_scale: ArrayLike,
    rhs_scale: ArrayLike,
    lhs_zero_point: ArrayLike | None = None,
    out_dtype=jnp.float32,
) -> jax.Array:
    """``lax.dot_general`` of int8 codes with int32 accumulation, rescaled to float.

    Args:
      lhs: ``int8`` activation codes; ``rhs``: ``int8`` (symmetric) weight codes.
      dimension_numbers: as for ``lax.dot_general``: ``((lhs_contract, rhs_contract),
        (lhs_batch, rhs_batch))``. Output axes: batch, lhs free, rhs free.
      lhs_scale: scalar or keepdims over ``lhs`` (per-token scales vary on free axes).
      rhs_scale: scalar or keepdims over ``rhs`` (per-channel scales on free axes).
      lhs_zero_point: optional asymmetric activation zero point, shaped like ``lhs_scale``.
      out_dtype: dtype of the result.

    Returns:
      ``s_lhs * s_rhs * (lhs - z) . rhs`` in ``out_dtype``.

    Raises:
      TypeError: operands that are not ``int8``.
      ValueError: a scale or zero point that varies along a contracted axis, or an axis
        outside ``[-ndim, ndim)`` in ``dimension_numbers``.
    """
    lhs, rhs = _check_int8("lhs", lhs), _check_int8("rhs", rhs)
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc = _axes("lhs contracting", lc, lhs.ndim), _axes("rhs contracting", rc, rhs.ndim)
    lb, rb = _axes("lhs batch", lb, lhs.ndim), _axes("rhs batch", rb, rhs.ndim)
    if (len(set(lc + lb)) != len(lc + lb) or len(set(rc + rb)) != len(rc + rb)
            or [lhs.shape[i] for i in lc + lb] != [rhs.shape[i] for i in rc + rb]):
        raise ValueError(f"dimension_numbers {dimension_numbers} must pair distinct axes of "
                         f"equal sizes in operands of shapes {lhs.shape} and {rhs.shape}")
    l_free = [i for i in range(lhs.ndim) if i not in lc + lb]
    r_free = [i for i in range(rhs.ndim) if i not in rc + rb]
    s_l = _keepdims("lhs_scale", lhs_scale, lhs, lc)
    s_r = _keepdims("rhs_scale", rhs_scale, rhs, rc)
    z_l = _keepdims("lhs_zero_point", lhs_zero_point, lhs, lc)
    acc = _integer_contraction(lhs, rhs, lc, rc, lb, rb)
    lhs_out = lambda t: _to_output(t, lb, l_free, len(r_free))  # noqa: E731
    rhs_out = lambda t: _to_output(t, rb, len(l_free), r_free)  # noqa: E731
    if z_l is not None:
        wsum = jnp.sum(rhs.astype(jnp.int32), axis=rc, keepdims=True)
        acc = acc - lhs_out(z_l.astype(jnp.int32)) * rhs_out(wsum)
    scale = lhs_out(s_l.astype(jnp.float32)) * rhs_out(s_r.astype(jnp.float32))
    return (acc.astype(jnp.float32) * scale).astype(out_dtype)


def weight_only_dot_general(
    lhs: ArrayLike,
    codes: ArrayLike,
    dimension_numbers: DimensionNumbers,
    *,
    rhs_scale: ArrayLike,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """``lax.dot_general(lhs, codes * rhs_scale)``: weight-only quantized compute.

    The weight is exactly what ``dequantize`` gives (``float32(code) * scale``, cast to
    ``lhs``'s dtype). A float32 contraction without batch axes runs as `float_int8_matmul`:
    on CPU a native kernel dequantizes the codes panel by panel inside the matmul, so the
    dequantized weight is never written out (XLA holds it whole in a per-call temporary,
    which is what made weight-only slower than float32 on CPU). Anything else is XLA's
    ``dot_general`` on the dequantized weight.

    Args:
      lhs: float activations.
      codes: ``int8`` (symmetric) weight codes.
      dimension_numbers: as for ``lax.dot_general``.
      rhs_scale: scalar or keepdims over ``codes`` (per-channel scales on free axes).
      precision, preferred_element_type: as for ``lax.dot_general`` (the native kernel
        always multiplies and accumulates in float32).

    Raises:
      TypeError: a non-float ``lhs`` or non-int8 ``codes``.
      ValueError: a scale that varies along a contracted axis, or bad axes.
    """
    lhs, codes = jnp.asarray(lhs), _check_int8("codes", codes)
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise TypeError(f"lhs must be a float array, got dtype {lhs.dtype}")
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc = _axes("lhs contracting", lc, lhs.ndim), _axes("rhs contracting", rc, codes.ndim)
    lb, rb = _axes("lhs batch", lb, lhs.ndim), _axes("rhs batch", rb, codes.ndim)
    s_r = _keepdims("rhs_scale", rhs_scale, codes, rc).astype(jnp.float32)
    out_type = jnp.dtype(preferred_element_type or lhs.dtype)
    if lb or lhs.dtype != jnp.float32 or out_type != jnp.float32:
        weight = (codes.astype(jnp.float32) * s_r).astype(lhs.dtype)
        return lax.dot_general(lhs, weight, ((lc, rc), (lb, rb)), precision=precision,
                               preferred_element_type=preferred_element_type)
    a, b, out_shape = _as_matrices(lhs, codes, lc, rc)
    r_free = tuple(i for i in range(codes.ndim) if i not in rc)
    per_column = jnp.broadcast_to(s_r, tuple(1 if i in rc else d
                                             for i, d in enumerate(codes.shape)))
    scale = jnp.transpose(per_column, r_free + rc).reshape(-1)  # in b's column order
    return float_int8_matmul(a, b, scale).reshape(out_shape)


def _along(vec: jax.Array, axis: int, ndim: int) -> jax.Array:
    """A scalar or a 1-D array laid out along ``axis`` of an ``ndim`` output."""
    if vec.ndim == 0:
        return vec
    return vec.reshape(tuple(vec.size if i == axis else 1 for i in range(ndim)))


def _conv_padding(padding, n_sp: int) -> str | list[tuple[int, int]]:
    """Checks ``padding`` up front: a padding name, or one ``(lo, hi)`` pair per spatial axis."""
    if isinstance(padding, str):
        if padding.upper() not in PADDING_NAMES:
            raise ValueError(f"padding must be one of {PADDING_NAMES} or a sequence of "
                             f"(lo, hi) pairs, got {padding!r}")
        return padding
    try:
        pairs = [tuple(p) for p in padding]
        if len(pairs) != n_sp or any(len(p) != 2 for p in pairs):
            raise ValueError
        return [(operator.index(lo), operator.index(hi)) for lo, hi in pairs]
    except (TypeError, ValueError):
        raise ValueError(f"padding must be a padding name or {n_sp} (lo, hi) integer pairs, "
                         f"one per spatial axis, got {padding!r}") from None


def int8_conv_general_dilated(
    lhs: ArrayLike,
    rhs: ArrayLike,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    *,
    lhs_scale: ArrayLike,
    rhs_scale: ArrayLike,
    lhs_zero_point: ArrayLike | None = None,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    out_dtype=jnp.float32,
) -> jax.Array:
    """``lax.conv_general_dilated`` of int8 codes with int32 accumulation, rescaled to float.

    Args:
      lhs, rhs: ``int8`` input and (symmetric) kernel codes; the other positional and
        keyword arguments mean what they mean for ``lax.conv_general_dilated``.
      lhs_scale: scalar, or keepdims over ``lhs`` varying only along its batch axis.
      rhs_scale: scalar, or keepdims over ``rhs`` varying only along its output-feature axis.
      lhs_zero_point: optional scalar zero point. Padding (and input dilation) then inserts
        the zero point, the code of a real 0, instead of the integer 0.
      out_dtype: dtype of the result.

    Returns:
      The rescaled convolution in ``out_dtype``. On GPU it is computed on the codes as
      float32 at full precision (exact for windows of up to 518 inputs), since XLA's GPU
      int8 convolution gave wrong sums.

    Raises:
      TypeError: operands that are not ``int8``.
      ValueError: ``padding`` that is neither ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` nor
        one ``(lo, hi)`` integer pair per spatial axis; a non-scalar zero point; scales
        that vary along other axes than described above.
    """
    lhs, rhs = _check_int8("lhs", lhs), _check_int8("rhs", rhs)
    dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_spec, rhs_spec, out_spec = dnums
    n_sp = lhs.ndim - 2
    for name, v in (("window_strides", window_strides), ("lhs_dilation", lhs_dilation),
                    ("rhs_dilation", rhs_dilation)):
        if v is not None and (len(tuple(v)) != n_sp or any(
                isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                for d in v)):
            raise ValueError(f"{name} must be {n_sp} positive ints, got {v!r}")
    padding = _conv_padding(padding, n_sp)
    s_l = _keepdims("lhs_scale", lhs_scale, lhs,
                    [i for i in range(lhs.ndim) if i != lhs_spec[0]])
    s_r = _keepdims("rhs_scale", rhs_scale, rhs,
                    [i for i in range(rhs.ndim) if i != rhs_spec[0]])
    z_l = None if lhs_zero_point is None else jnp.asarray(lhs_zero_point)
    if z_l is not None and z_l.ndim:
        raise ValueError(f"lhs_zero_point must be a scalar for a convolution, got shape "
                         f"{z_l.shape}")
    conv = dict(rhs_dilation=rhs_dilation, dimension_numbers=dnums,
                feature_group_count=feature_group_count)

    args = (window_strides, padding, lhs_dilation, z_l)
    acc = lax.platform_dependent(
        lhs, rhs, cuda=lambda lhs, rhs: _float_conv_of_codes(lhs, rhs, *args, **conv),
        default=lambda lhs, rhs: _integer_conv(lhs, rhs, *args, **conv))
    per_out = lambda t: _along(t.reshape(-1) if t.ndim else t, out_spec[1], acc.ndim)  # noqa: E731
    per_batch = lambda t: _along(t.reshape(-1) if t.ndim else t, out_spec[0], acc.ndim)  # noqa: E731
    scale = per_batch(s_l.astype(jnp.float32)) * per_out(s_r.astype(jnp.float32))
    return (acc * scale).astype(out_dtype)


def _float_conv_of_codes(lhs, rhs, window_strides, padding, lhs_dilation, z_l,
                         **conv) -> jax.Array:
    """The GPU path of `int8_conv_general_dilated`: XLA's int8 convolution on GPU returned
    wrong sums (jax 0.11.2 on an H200: one input channel, grouped convolutions, zero-point
    padding), so the codes minus the zero point are convolved as float32 at full
    precision. Exact while partial sums stay below 2**24 (any window of up to 518 inputs:
    ``255 * 127 * 518 < 2**24``), off by float rounding only beyond."""
    shifted = lhs.astype(jnp.float32) - (0.0 if z_l is None else z_l.astype(jnp.float32))
    return lax.conv_general_dilated(shifted, rhs.astype(jnp.float32), window_strides, padding,
                                    lhs_dilation=lhs_dilation,
                                    precision=lax.Precision.HIGHEST, **conv)


def _integer_conv(lhs, rhs, window_strides, padding, lhs_dilation, z_l, *, rhs_dilation,
                  dimension_numbers, feature_group_count) -> jax.Array:
    """The int32 convolution of the codes minus the zero point, as float32."""
    lhs_spec, rhs_spec, out_spec = dnums = dimension_numbers
    n_sp = lhs.ndim - 2
    if z_l is not None:
        dil = tuple(lhs_dilation or (1,) * n_sp)
        if isinstance(padding, str):
            if dil != (1,) * n_sp:
                raise ValueError("string padding with lhs_dilation is not supported")
            rdil = tuple(rhs_dilation or (1,) * n_sp)
            window = [(rhs.shape[rhs_spec[2 + i]] - 1) * rdil[i] + 1 for i in range(n_sp)]
            padding = lax.padtype_to_pads([lhs.shape[lhs_spec[2 + i]] for i in range(n_sp)],
                                          window, window_strides, padding)
        if not _patch_matmul_applies(lhs, lhs_dilation, rhs_dilation, feature_group_count):
            config = [(0, 0, 0)] * lhs.ndim
            for i, (lo, hi) in enumerate(padding):
                config[lhs_spec[2 + i]] = (int(lo), int(hi), dil[i] - 1)
            # The barrier keeps XLA from fusing the pad into the int8 convolution: with a
            # constant zero point of 0, XLA's CPU backend compiled that fusion to wrong sums
            # that changed from run to run (jax 0.10.2) or failed to lower it ("add i32,
            # i8", jax 0.12.1); tests/test_quant_int8_ops.py holds the case.
            lhs = lax.optimization_barrier(lax.pad(lhs, z_l.astype(jnp.int8), config))
            padding, lhs_dilation = [(0, 0)] * n_sp, None
        # else the native kernel pads with the zero point itself (no padded copy of lhs).
    if _patch_matmul_applies(lhs, lhs_dilation, rhs_dilation, feature_group_count):
        acc = _conv_as_int8_matmul(lhs, rhs, window_strides, padding, dnums,
                                   fill=None if z_l is None else z_l.astype(jnp.int8))
    else:
        acc = lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dnums,
            feature_group_count=feature_group_count, preferred_element_type=jnp.int32)
    if z_l is not None:
        wsum = jnp.sum(rhs.astype(jnp.int32), axis=tuple(rhs_spec[1:]))
        acc = acc - z_l.astype(jnp.int32) * _along(wsum, out_spec[1], acc.ndim)
    return acc.astype(jnp.float32)


def _patch_matmul_applies(lhs, lhs_dilation, rhs_dilation, feature_group_count) -> bool:
    """2-D, one feature group, no dilation, and the native int8 kernel present."""
    return (lhs.ndim == 4 and feature_group_count == 1 and native_int8_available()
            and all(d == 1 for d in (lhs_dilation or ()))
            and all(d == 1 for d in (rhs_dilation or ())))


def _conv_as_int8_matmul(lhs, rhs, window_strides, padding, dnums, *, fill=None
                         ) -> jax.Array:
    """The exact int32 convolution as patches @ kernel on the VNNI kernel.

    XLA's CPU backend runs int8 convolutions far slower than float32 ones (a ResNet-18-like
    net under W8A8 was 1.6-1.8x slower than fp32); the patch matrix (one row per output
    pixel, the kh * kw * C inputs of its window) times the kernel as a (kh * kw * C, O)
    matrix is the same sum of products. On CPU the native kernel reads each pixel's window
    straight from the input (`int8_conv_codes`: no im2col copy, and no padded copy: the
    padding, ``fill`` (a scalar int8 zero point) or 0, is implicit); elsewhere the
    patches are built and multiplied by `int8_matmul` (XLA's int32 dot): still exact.
    """
    lhs_spec, rhs_spec, out_spec = dnums
    x = jnp.transpose(lhs, (lhs_spec[0], lhs_spec[2], lhs_spec[3], lhs_spec[1]))  # NHWC
    w = jnp.transpose(rhs, (rhs_spec[2], rhs_spec[3], rhs_spec[1], rhs_spec[0]))  # HWIO
    kh, kw, c, o = w.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), window_strides, padding)
    pads = [(int(lo), int(hi)) for lo, hi in padding]
    if any(p < 0 for pair in pads for p in pair):  # negative padding crops: slice first
        x = lax.pad(x, jnp.int8(0), [(0, 0, 0), *((min(lo, 0), min(hi, 0), 0)
                                                  for lo, hi in pads), (0, 0, 0)])
        pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
    (plo, phi), (qlo, qhi) = pads
    fill = jnp.zeros((), jnp.int8) if fill is None else jnp.reshape(fill, ()).astype(jnp.int8)
    sh, sw = window_strides
    ho = (x.shape[1] + plo + phi - kh) // sh + 1
    wo = (x.shape[2] + qlo + qhi - kw) // sw + 1
    n = x.shape[0]
    if ho <= 0 or wo <= 0:
        acc = jnp.zeros((n, max(ho, 0), max(wo, 0), o), jnp.int32)
    else:
        # Zero channels up to kw * C % 4 == 0: each window row is then whole VNNI quads
        # (zero inputs meet zero weights, so the sums are unchanged).
        extra_c = 0
        while (kw * (c + extra_c)) % 4:
            extra_c += 1
        if extra_c or _border_fraction(x.shape[1:3], (kh, kw), (sh, sw), pads) > 0.5:
            # Pad explicitly where it costs no more: the channels are copied anyway, or most
            # windows touch the padding (a small map: gathering them, a few bytes each,
            # was slower than one padded copy, e.g. 4x4x64 at batch 256 by ~10%).
            x = lax.pad(x, fill, [(0, 0, 0), (plo, phi, 0), (qlo, qhi, 0), (0, 0, 0)])
            plo = phi = qlo = qhi = 0
        if extra_c:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra_c)))
            w = jnp.pad(w, ((0, 0), (0, 0), (0, extra_c), (0, 0)))
        cp = c + extra_c
        kernel = w.reshape(kh * kw * cp, o)

        def patches_matmul(x, kernel, fill):  # im2col, then the int8 matmul (XLA's off CPU)
            x = lax.pad(x, fill, [(0, 0, 0), (plo, phi, 0), (qlo, qhi, 0), (0, 0, 0)])
            cols = [lax.slice(x, (0, i, j, 0),
                              (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cp),
                              (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
            return int8_matmul(jnp.concatenate(cols, axis=-1).reshape(n * ho * wo, -1),
                               kernel)

        acc = int8_conv_codes(x, kernel, fill, window=(kh, kw), strides=(sh, sw),
                              padding=((plo, phi), (qlo, qhi)),
                              fallback=patches_matmul).reshape(n, ho, wo, o)
    perm = [0] * 4
    for j, axis in enumerate((out_spec[0], out_spec[2], out_spec[3], out_spec[1])):
        perm[axis] = j
    return jnp.transpose(acc, perm)


def _border_fraction(size, window, strides, pads) -> float:
    """The fraction of a 2-D convolution's output pixels whose window touches the padding."""
    inside = 1.0
    for n, k, s, (lo, hi) in zip(size, window, strides, pads):
        out = (n + lo + hi - k) // s + 1
        inside *= sum(0 <= o * s - lo and o * s - lo + k <= n for o in range(out)) / out
    return 1.0 - inside


def parse_einsum(spec: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
    """Splits a two-operand explicit einsum into letter strings, ellipses expanded."""
    spec = spec.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"einsum spec must be explicit with two operands, got {spec!r}")
    ins, out = spec.split("->")
    a, b = ins.split(",")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                 if c not in spec)
    n_ell = max([nd - len(t.replace("...", "")) for t, nd in ((a, lhs_ndim), (b, rhs_ndim))
                 if "..." in t] or [0])
    ell = "".join(next(spare) for _ in range(n_ell))

    def expand(term: str, ndim: int) -> str:
        if "..." not in term:
            return term
        k = ndim - len(term.replace("...", ""))
        return term.replace("...", ell[len(ell) - k:] if k > 0 else "")

    a, b, out = expand(a, lhs_ndim), expand(b, rhs_ndim), out.replace("...", ell)
    for term, nd in ((a, lhs_ndim), (b, rhs_ndim), (out, None)):
        if (nd is not None and len(term) != nd) or len(set(term)) != len(term):
            raise ValueError(f"einsum spec {spec!r}: term {term!r} has repeated letters or "
                             f"does not match its operand's rank {nd}")
    lonely = [c for c in a + b if c not in out and not (c in a and c in b)]
    if lonely:
        raise ValueError(f"einsum spec {spec!r} sums letters {lonely} within one operand; "
                         f"the int8 path supports contractions between the operands only")
    return a, b, out


def int8_einsum(
    spec: str,
    lhs: ArrayLike,
    rhs: ArrayLike,
    *,
    lhs_scale: ArrayLike,
    rhs_scale: ArrayLike,
    lhs_zero_point: ArrayLike | None = None,
    out_dtype=jnp.float32,
) -> jax.Array:
    """Two-operand ``jnp.einsum`` of int8 codes with int32 accumulation, rescaled to float.

    Scales and the zero point are keepdims over their operand (size 1 on letters that are
    contracted). See `int8_dot_general`.
    """
    lhs, rhs = _check_int8("lhs", lhs), _check_int8("rhs", rhs)
    a, b, out = parse_einsum(spec, lhs.ndim, rhs.ndim)
    contract = [c for c in a if c in b and c not in out]
    batch = [c for c in a if c in b and c in out]
    dims = ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
            (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
    y = int8_dot_general(lhs, rhs, dims, lhs_scale=lhs_scale, rhs_scale=rhs_scale,
                         lhs_zero_point=lhs_zero_point, out_dtype=out_dtype)
    produced = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
    return jnp.transpose(y, tuple(produced.index(c) for c in out))
