"""Weight-only quantized matmul: float activations times a 2-D `QTensor` weight.

`weight_only_matmul` is ``x @ dequantize(qt)`` without the dequantized weight: on a CPU
with AVX-512 a native kernel reads the int8 or packed int4 codes directly (a GEMV at batch
1 that streams each code once, a panel-by-panel dequantizing GEMM above; see
`jaxopt_lab.quant.native`). Every other layout, platform or setting runs XLA's dot on
``dequantize(qt)``.

Examples:
  >>> import jax.numpy as jnp, jaxopt_lab as jol
  >>> from jaxopt_lab.quant.weight_only import weight_only_matmul
  >>> w = jnp.arange(12.0).reshape(3, 4) - 6
  >>> qt = jol.quantize(w, bits=4)  # one scale per output column
  >>> x = jnp.ones((1, 3))
  >>> bool(jnp.allclose(weight_only_matmul(x, qt), x @ jol.dequantize(qt), rtol=1e-6))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_lab.quant import native
from jaxopt_lab.quant.qtensor import QTensor, packed_length


def _single_axis(axis) -> int | None:
    """A QTensor axis field as one int: an int, or a 1-tuple of ints; else ``None``."""
    if isinstance(axis, (tuple, list)):
        return int(axis[0]) if len(axis) == 1 else None
    return None if axis is None else int(axis)


def _as_rows(qt: QTensor) -> tuple[jax.Array, jax.Array | None] | None:
    """Scale (and zero point) as ``(G, N)`` rows whose groups run along K, or ``None`` when
    the kernel does not take this layout."""
    k, n = qt.shape
    scale, zp = jnp.asarray(qt.scale), qt.zero_point
    if qt.granularity == "tensor" and scale.size == 1:
        rows = (1, 1)
    elif qt.granularity == "channel" and _single_axis(qt.axis) in (1, -1) \
            and scale.shape == (n,):
        rows = (1, n)
    elif (qt.granularity == "group" and _single_axis(qt.group_axis) in (0, -2)
          and qt.group_size and k % qt.group_size == 0
          and scale.shape == (k // qt.group_size, n)):
        rows = scale.shape
    else:
        return None
    if zp is not None and (jnp.dtype(zp.dtype) != jnp.int8 or zp.size != scale.size):
        return None
    full = (rows[0], n)
    scale = jnp.broadcast_to(scale.astype(jnp.float32).reshape(rows), full)
    if zp is not None:
        zp = jnp.broadcast_to(jnp.asarray(zp).reshape(rows), full)
    return scale, zp


def _check(x: jax.Array, qt: QTensor) -> None:
    if not isinstance(qt, QTensor):
        raise ValueError(f"qt must be a QTensor, got {type(qt).__name__}")
    if qt.ndim != 2 or jnp.ndim(qt.qvalue) != 2:
        raise ValueError(f"qt must be one 2-D (K, N) QTensor, got shape {qt.shape} with "
                         f"storage {jnp.shape(qt.qvalue)}")
    if x.ndim != 2 or x.shape[1] != qt.shape[0] or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float (M, K) array with K = {qt.shape[0]}, got "
                         f"{x.dtype}{x.shape}")


def weight_only_matmul(x: jax.typing.ArrayLike, qt: QTensor, *, precision=None) -> jax.Array:
    """``x @ dequantize(qt)`` for float ``(M, K)`` activations and a ``(K, N)`` `QTensor`.

    The weights are ``qt.dequantize(jnp.float32)``; the product is accumulated in float32
    and rounded once to ``x``'s dtype. On CPU with the native kernels (int8 or 4-bit
    codes; per-tensor, per-output-channel or K-grouped scales; with or without zero point)
    it equals XLA's float32 dot on those weights up to summation order; elsewhere it is
    that dot.

    Args:
      x: float32 or bfloat16 ``(M, K)`` activations (``M`` may be 1).
      qt: a 2-D `QTensor` of shape ``(K, N)`` (no stacked batch axes).
      precision: passed to XLA's dot where XLA computes the product.

    Returns:
      ``(M, N)`` in ``x``'s dtype.

    Raises:
      ValueError: ``qt`` is not a 2-D `QTensor` or ``x`` is not a float ``(M, K)`` array.
    """
    x = jnp.asarray(x)
    _check(x, qt)
    k, n = qt.shape

    def xla(*_):
        w = qt.dequantize(jnp.float32)
        return lax.dot(x.astype(jnp.float32), w, precision=precision,
                       preferred_element_type=jnp.float32)

    operands = _native_operands(qt)
    if operands is None:
        return xla().astype(x.dtype)
    y = native.weight_only_matmul_codes(x.astype(jnp.float32), *operands, bits=qt.bits,
                                        fallback=xla)
    return y.astype(x.dtype)


def _native_operands(qt: QTensor) -> tuple[jax.Array, jax.Array, jax.Array | None] | None:
    """``(codes, scale rows, zero point rows)`` of a ``(K, N)`` `QTensor` in the native
    kernels' layout, or ``None`` when they do not take it."""
    k, n = qt.shape
    rows = _as_rows(qt) if qt.fp8 is None and qt.bits in (4, 8) else None
    storage = jnp.int8 if qt.bits == 8 else jnp.uint8
    if (rows is None or jnp.dtype(qt.qvalue.dtype) != storage
            or jnp.shape(qt.qvalue) != (k, packed_length(n, qt.bits))):
        return None
    return (jnp.asarray(qt.qvalue), *rows)


def conv_patches(x: jax.Array, window: tuple[int, int], window_strides, padding
                 ) -> tuple[jax.Array, tuple[int, int, int]]:
    """The im2col matrix of an NHWC input: one row per output pixel holding the
    ``kh * kw * C`` inputs of its window (in HWI order), and the output's ``(N, Ho, Wo)``.

    ``padding`` is a padding name or ``((lo, hi), (lo, hi))``; padded inputs are zeros.
    """
    kh, kw = window
    n, _, _, c = x.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), window_strides, padding)
    (plo, phi), (qlo, qhi) = padding
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (plo, phi, 0), (qlo, qhi, 0), (0, 0, 0)])
    sh, sw = window_strides
    ho, wo = max(0, (x.shape[1] - kh) // sh + 1), max(0, (x.shape[2] - kw) // sw + 1)
    if ho == 0 or wo == 0:
        return jnp.zeros((0, kh * kw * c), x.dtype), (n, ho, wo)
    cols = [lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1).reshape(n * ho * wo, kh * kw * c), (n, ho, wo)


def weight_only_conv(x: jax.typing.ArrayLike, qt: QTensor, window_strides, padding, *,
                     precision=None) -> jax.Array:
    """A 2-D convolution of NHWC ``x`` with an HWIO `QTensor` kernel, as patches @ kernel.

    The kernel is its ``(kh * kw * Cin, Cout)`` matrix of codes. On CPU the native kernel
    reads those codes (int8 or 4-bit, dequantized a panel at a time, never written whole)
    and each output pixel's window straight from ``x`` (no im2col copy, and no padded copy:
    the padding is implicit, bit-identical to padding ``x`` first);
    elsewhere the patches multiply the dequantized matrix. The result equals ``lax.conv_general_dilated(x, dequantize(qt), ...)`` up
    to float32 summation order. Unit dilation and one feature group only.

    Args:
      x: float ``(N, H, W, Cin)`` input.
      qt: ``(kh, kw, Cin, Cout)`` `QTensor` with one scale per tensor or per output channel
        (axis 3), or groups along the contraction that `weight_only_matmul` takes.
      window_strides: two positive ints.
      padding: ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"`` or two ``(lo, hi)`` pairs.
      precision: passed on to `weight_only_matmul`.

    Returns:
      ``(N, Ho, Wo, Cout)`` in ``x``'s dtype.

    Raises:
      ValueError: ``x`` or ``qt`` of the wrong rank or channel count.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4))
      >>> qt = jol.quantize(w, bits=8)  # one scale per output channel
      >>> x = jnp.ones((1, 5, 5, 2))
      >>> ref = jax.lax.conv_general_dilated(x, jol.dequantize(qt), (1, 1), "SAME",
      ...     dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> y = weight_only_conv(x, qt, (1, 1), "SAME")
      >>> bool(jnp.allclose(y, ref, rtol=1e-5, atol=1e-5))
      True
    """
    x = jnp.asarray(x)
    if not isinstance(qt, QTensor) or qt.ndim != 4:
        raise ValueError(f"qt must be a 4-D (kh, kw, Cin, Cout) QTensor, got "
                         f"{type(qt).__name__} of shape {getattr(qt, 'shape', None)}")
    kh, kw, cin, cout = qt.shape
    if x.ndim != 4 or x.shape[3] != cin:
        raise ValueError(f"x must be (N, H, W, {cin}) for a kernel of shape {qt.shape}, got "
                         f"{x.shape}")
    strides = tuple(int(v) for v in window_strides)
    mat = _kernel_matrix(qt)
    operands = None if mat is None else _native_operands(mat)
    if operands is None:  # no (K, N) view of the scales: XLA's convolution, dequantized
        return lax.conv_general_dilated(
            x, qt.dequantize(jnp.float32).astype(x.dtype), strides, padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
    pads = [(int(lo), int(hi)) for lo, hi in padding]
    x32 = x.astype(jnp.float32)
    if any(p < 0 for pair in pads for p in pair):  # negative padding crops: slice first
        x32 = lax.pad(x32, jnp.float32(0), [(0, 0, 0), *((min(lo, 0), min(hi, 0), 0)
                                                         for lo, hi in pads), (0, 0, 0)])
        pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
    (plo, phi), (qlo, qhi) = pads
    n = x.shape[0]
    ho = max(0, (x32.shape[1] + plo + phi - kh) // strides[0] + 1)
    wo = max(0, (x32.shape[2] + qlo + qhi - kw) // strides[1] + 1)
    if n * ho * wo == 0:
        return jnp.zeros((n, ho, wo, cout), x.dtype)

    def xla(x32, *_):  # the patches of the padded input times the dequantized kernel matrix
        cols, _ = conv_patches(x32, (kh, kw), strides, pads)
        return lax.dot(cols, mat.dequantize(jnp.float32), precision=precision,
                       preferred_element_type=jnp.float32)

    # The padding is implicit in the native kernel: no padded copy of x is made.
    y = native.weight_only_conv_codes(x32, *operands, bits=mat.bits, window=(kh, kw),
                                      strides=strides, padding=tuple(pads), fallback=xla)
    return y.reshape(n, ho, wo, cout).astype(x.dtype)


def _kernel_matrix(qt: QTensor) -> QTensor | None:
    """An HWIO kernel `QTensor` as its ``(kh * kw * Cin, Cout)`` matrix (storage only
    reshaped), or ``None`` when its scales have no such view."""
    kh, kw, cin, cout = qt.shape
    k = kh * kw * cin
    axis = tuple(qt.axis) if isinstance(qt.axis, (tuple, list)) else qt.axis
    group_axis = (tuple(qt.group_axis) if isinstance(qt.group_axis, (tuple, list))
                  else qt.group_axis)
    rows = {"tensor": (), "channel": (cout,), "group": (k // (qt.group_size or 1), cout)}
    # Groups along Cin alone (each window position its own groups) or along the whole
    # flattened (kh, kw, Cin): either way consecutive runs of K rows in HWI order.
    ok = {"tensor": True, "channel": axis in ((3,), 3),
          "group": group_axis in ((2,), 2, (0, 1, 2))}.get(qt.granularity, False)
    if (not ok or qt.fp8 is not None or jnp.ndim(qt.qvalue) != 4
            or jnp.shape(qt.qvalue)[:3] != (kh, kw, cin)):
        return None
    shape2 = rows[qt.granularity]
    zero = None if qt.zero_point is None else jnp.reshape(qt.zero_point, shape2)
    return QTensor(jnp.reshape(qt.qvalue, (k, -1)), jnp.reshape(qt.scale, shape2), zero,
                   bits=qt.bits, shape=(k, cout), dtype=qt.dtype, granularity=qt.granularity,
                   axis=(1,) if qt.granularity == "channel" else None,
                   group_axis=(0,) if qt.granularity == "group" else None,
                   group_size=qt.group_size)
