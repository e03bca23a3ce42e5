"""`QTensor`: quantized storage as a pytree node, and exact sub-byte bit packing.

A `QTensor` holds the integer codes (``qvalue``), a float32 ``scale`` and an optional
integer ``zero_point`` as pytree children, and everything static (bits, granularity,
axes, original shape and dtype, fp8 format) as aux data. So it passes through
``jit``, ``vmap``, ``pmap``, ``device_put`` and sharding like any pytree of arrays.

Storage layout:

* 8-bit integers: ``int8`` with the original shape (0-d arrays stored as shape ``(1,)``).
* 2, 3 and 4 bits: ``uint8`` packed along the last axis, little-endian within a byte:
  four 2-bit codes or two 4-bit codes per byte, and eight 3-bit codes per three bytes.
  The last axis is zero-padded to a whole number of bytes (words for 3 bits), so packed
  storage has shape ``shape[:-1] + (packed_length(shape[-1], bits),)``.
* fp8: the float8 array itself (``float8_e4m3fn`` or ``float8_e5m2``), original shape.

``scale`` and ``zero_point`` shapes by granularity:

* ``"tensor"``: ``()``;
* ``"channel"``: ``tuple(shape[a] for a in axis)`` -- ``axis`` is a tuple of the channel
  axes (one scale per real output element: ``(heads, head_dim)`` for an attention query
  kernel ``(embed, heads, head_dim)``);
* ``"group"``: ``group_axis`` is a tuple of *contiguous* axes (the contraction, flattened when
  it spans several axes, e.g. ``(heads, head_dim)`` of an attention output kernel); their
  flattened length ``n`` is replaced by ``n // group_size``: one scale per ``group_size``
  consecutive contraction elements and per index of every other axis.

Children may carry extra *leading* axes (a QTensor stacked by ``vmap``/``pmap`` or
``jnp.stack`` through ``jax.tree.map``); `QTensor.values` and `QTensor.dequantize`
treat them as batch axes and return ``batch + shape``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_lab.quant.affine import clamp_cast

INT_BITS = (2, 3, 4, 8)
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
GRANULARITIES = ("tensor", "channel", "group")


def word_layout(bits: int) -> tuple[int, int]:
    """(codes per word, bytes per word): the smallest whole-byte run of ``bits``-bit codes."""
    lcm = math.lcm(bits, 8)
    return lcm // bits, lcm // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take along the packed axis."""
    if bits == 8:
        return n
    codes, nbytes = word_layout(bits)
    return -(-n // codes) * nbytes


def _lane(values: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a 1-D constant so it broadcasts along the last axis of an ``ndim`` array."""
    return values.reshape((1,) * (ndim - 1) + values.shape)


@functools.partial(jax.jit, static_argnames=("bits",))
def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs signed ``bits``-bit integer codes along the last axis into ``uint8``.

    Args:
      codes: integer array (any integer dtype) with values in
        ``[-2**(bits-1), 2**(bits-1) - 1]`` and ``ndim >= 1``.
      bits: 2, 3, 4 or 8. 8 bits returns ``int8`` unchanged in shape.

    Returns:
      ``uint8`` array of shape ``codes.shape[:-1] + (packed_length(n, bits),)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> pack(jnp.array([1, -1, 0, -2], jnp.int8), 4).tolist()
      [241, 224]
    """
    if bits == 8:
        return codes.astype(jnp.int8)
    per_word, word_bytes = word_layout(bits)
    n = codes.shape[-1]
    words = -(-n // per_word)
    u = (codes.astype(jnp.int32) & ((1 << bits) - 1)).astype(jnp.uint32)
    pad = [(0, 0)] * (u.ndim - 1) + [(0, words * per_word - n)]
    u = jnp.pad(u, pad).reshape(u.shape[:-1] + (words, per_word))
    shifts = _lane(jnp.arange(per_word, dtype=jnp.uint32) * bits, u.ndim)
    word = jnp.sum(u << shifts, axis=-1, dtype=jnp.uint32)  # bit fields never overlap
    byte_shifts = _lane(jnp.arange(word_bytes, dtype=jnp.uint32) * 8, word.ndim + 1)
    out = (word[..., None] >> byte_shifts) & 0xFF
    return out.reshape(codes.shape[:-1] + (words * word_bytes,)).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of `pack`: ``int8`` codes of length ``n`` along the last axis (pure jnp)."""
    if bits == 8:
        return packed.astype(jnp.int8)
    per_word, word_bytes = word_layout(bits)
    words = packed.shape[-1] // word_bytes
    b = packed.astype(jnp.uint32).reshape(packed.shape[:-1] + (words, word_bytes))
    byte_shifts = _lane(jnp.arange(word_bytes, dtype=jnp.uint32) * 8, b.ndim)
    word = jnp.sum(b << byte_shifts, axis=-1, dtype=jnp.uint32)
    shifts = _lane(jnp.arange(per_word, dtype=jnp.uint32) * bits, word.ndim + 1)
    u = ((word[..., None] >> shifts) & ((1 << bits) - 1)).astype(jnp.int32)
    u = u.reshape(packed.shape[:-1] + (words * per_word,))[..., :n]
    half = 1 << (bits - 1)
    return jnp.where(u >= half, u - (1 << bits), u).astype(jnp.int8)  # sign extension


_AUX = ("bits", "granularity", "axis", "group_axis", "group_size", "shape", "dtype_name", "fp8")


class QTensor:
    """A quantized array: codes, scale and zero point as children; the rest static.

    Build one with `jaxopt_lab.quantize`; read it back with `dequantize`. Fields:

    * ``qvalue``: storage (see the module docstring for the layout);
    * ``scale``: float32 (bfloat16 if quantized with ``scale_dtype="bfloat16"``),
      ``x_hat = (q - zero_point) * scale``;
    * ``zero_point``: ``int8`` of ``scale``'s shape, or ``None`` for symmetric codes;
    * ``bits``, ``granularity`` (``"tensor"|"channel"|"group"``), ``axis`` (channel axes,
      non-negative, or ``None``), ``group_axis`` and ``group_size`` (``None`` unless
      ``"group"``; axes are tuples, an int is accepted for one axis), ``shape`` and
      ``dtype`` of the original array, ``fp8`` (format name or
      ``None``).

    Raises:
      ValueError: at construction, naming the field, for inconsistent metadata (unknown
        granularity, axes out of range, a group size that does not divide, a scale of the
        wrong shape).

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> qt = jol.quantize(jnp.ones((4, 6)), bits=4)
      >>> qt.shape, qt.qvalue.shape, qt.qvalue.dtype, qt.scale.shape
      ((4, 6), (4, 3), dtype('uint8'), (6,))
      >>> bool((qt.dequantize() == 1).all())
      True
    """

    __slots__ = ("qvalue", "scale", "zero_point") + _AUX

    def __init__(
        self,
        qvalue: Any,
        scale: Any,
        zero_point: Any = None,
        *,
        bits: int,
        shape: tuple[int, ...],
        dtype: Any,
        granularity: str = "tensor",
        axis: int | None = None,
        group_axis: int | None = None,
        group_size: int | None = None,
        fp8: str | None = None,
    ):
        # Children are checked only for the shape of a concrete scale: jax rebuilds nodes with
        # tracers, None or specs (through tree_unflatten, which skips __init__).
        self.qvalue, self.scale, self.zero_point = qvalue, scale, zero_point
        meta = check_metadata(bits=bits, shape=shape, dtype=dtype, granularity=granularity,
                              axis=axis, group_axis=group_axis, group_size=group_size, fp8=fp8)
        for k, v in meta.items():
            setattr(self, k, v)
        want = self.scale_shape
        for name, child in (("scale", scale), ("zero_point", zero_point)):
            got = getattr(child, "shape", None)
            if got is not None and tuple(got[len(got) - len(want):]) != want:
                raise ValueError(f"QTensor {name}: shape {tuple(got)} does not end in the "
                                 f"{want} that granularity={self.granularity!r} needs for "
                                 f"an array of shape {self.shape}")

    # --- pytree protocol ---
    def _aux(self) -> tuple:
        return tuple(getattr(self, k) for k in _AUX)

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(k) for k in ("qvalue", "scale", "zero_point")]
        return list(zip(keys, (self.qvalue, self.scale, self.zero_point))), self._aux()

    def tree_flatten(self):
        return (self.qvalue, self.scale, self.zero_point), self._aux()

    @classmethod
    def tree_unflatten(cls, aux: tuple, children) -> QTensor:
        obj = object.__new__(cls)
        obj.qvalue, obj.scale, obj.zero_point = children
        for k, v in zip(_AUX, aux):
            setattr(obj, k, v)
        return obj

    # --- static properties of the original array ---
    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of ``scale`` (and ``zero_point``) for one (unbatched) tensor."""
        return scale_shape(self.shape, self.granularity, self.axis, self.group_axis,
                           self.group_size)

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """Shape of ``qvalue`` for one (unbatched) tensor."""
        shape = self.shape or (1,)
        if self.fp8 is not None:
            return shape
        return shape[:-1] + (packed_length(shape[-1], self.bits),)

    @property
    def nbytes(self) -> int:
        """Bytes of the children (storage, scale, zero point), batch axes included."""
        return sum(int(np.prod(np.shape(c))) * jnp.dtype(c.dtype).itemsize
                   for c in (self.qvalue, self.scale, self.zero_point) if c is not None)

    def _batch_shape(self) -> tuple[int, ...]:
        extra = np.ndim(self.qvalue) - len(self.storage_shape)
        if extra < 0 or tuple(np.shape(self.qvalue)[extra:]) != self.storage_shape:
            raise ValueError(
                f"QTensor storage of shape {np.shape(self.qvalue)} does not match the "
                f"expected {self.storage_shape} for an array of shape {self.shape}"
            )
        return tuple(np.shape(self.qvalue)[:extra])

    def values(self) -> jax.Array:
        """Unpacked codes (``int8``, or the fp8 array) of shape ``batch + shape``."""
        return _values(self.qvalue, self._batch_shape(), self._aux())

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """``(q - zero_point) * scale`` in float32, cast to ``dtype`` (default: original)."""
        out_dtype = jnp.dtype(self.dtype if dtype is None else dtype).name
        return _dequantize(self.qvalue, self.scale, self.zero_point, self._batch_shape(),
                           self._aux(), out_dtype)

    def __repr__(self) -> str:
        kind = self.fp8 or f"int{self.bits}"
        extra = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"QTensor(shape={self.shape}, dtype={self.dtype_name}, {kind}, "
                f"granularity={self.granularity!r}{extra}, symmetric={self.symmetric})")


def _axes(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, (tuple, list)) else (value,)
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise ValueError(f"QTensor {name} must be an int or a tuple of ints, got {value!r}")
        out.append(int(a))
    return tuple(out)


def check_metadata(*, bits, shape, dtype, granularity, axis, group_axis, group_size, fp8
                   ) -> dict[str, Any]:
    """Validates and normalises a QTensor's static fields (axes become sorted tuples).

    Raises:
      ValueError: naming the first inconsistent field and its value.
    """
    if isinstance(bits, bool) or bits not in INT_BITS:
        raise ValueError(f"QTensor bits must be one of {INT_BITS}, got {bits!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"QTensor granularity must be one of {GRANULARITIES}, "
                         f"got {granularity!r}")
    if fp8 is not None and (fp8 not in FP8_DTYPES or bits != 8):
        raise ValueError(f"QTensor fp8 must be None or one of {FP8_DTYPES} with bits=8, got "
                         f"fp8={fp8!r}, bits={bits!r}")
    try:
        shape = tuple(int(d) for d in shape)
        dtype_name = jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"QTensor shape/dtype invalid: {shape!r}, {dtype!r} ({e})") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"QTensor shape must be non-negative, got {shape}")
    ndim = len(shape)
    axis, group_axis = _axes(axis, "axis"), _axes(group_axis, "group_axis")
    for name, axes in (("axis", axis), ("group_axis", group_axis)):
        if axes is not None:
            if any(not -ndim <= a < ndim for a in axes) or not axes:
                raise ValueError(f"QTensor {name} {axes} out of range for shape {shape}")
            axes = tuple(sorted(a % ndim for a in axes))
            if len(set(axes)) != len(axes):
                raise ValueError(f"QTensor {name} {axes} repeats an axis")
            if name == "axis":
                axis = axes
            else:
                group_axis = axes
    if granularity == "tensor" and (axis, group_axis, group_size) != (None, None, None):
        raise ValueError(f"QTensor granularity='tensor' takes no axis/group_axis/group_size, "
                         f"got {axis}, {group_axis}, {group_size}")
    if granularity == "channel" and (axis is None or group_axis is not None
                                      or group_size is not None):
        raise ValueError(f"QTensor granularity='channel' needs axis and no group fields, got "
                         f"axis={axis}, group_axis={group_axis}, group_size={group_size}")
    if granularity == "group":
        if group_axis is None or axis is not None:
            raise ValueError(f"QTensor granularity='group' needs group_axis and no axis, got "
                             f"axis={axis}, group_axis={group_axis}")
        if group_axis != tuple(range(group_axis[0], group_axis[-1] + 1)):
            raise ValueError(f"QTensor group_axis {group_axis} must be contiguous axes")
        n = math.prod(shape[a] for a in group_axis)
        if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
                or group_size <= 0 or n % group_size):
            raise ValueError(f"QTensor group_size {group_size!r} must be a positive int "
                             f"dividing {n} (axes {group_axis} of shape {shape})")
        group_size = int(group_size)
    return dict(bits=int(bits), granularity=str(granularity), axis=axis,
                group_axis=group_axis, group_size=group_size, shape=shape,
                dtype_name=dtype_name, fp8=fp8)


def scale_shape(shape, granularity, axis, group_axis, group_size) -> tuple[int, ...]:
    """The scale's shape for the (normalised) metadata; see the module docstring."""
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return tuple(shape[a] for a in axis)
    g0, g1 = group_axis[0], group_axis[-1] + 1
    return shape[:g0] + (math.prod(shape[g0:g1]) // group_size,) + shape[g1:]


def _group_view_shape(shape: tuple[int, ...], meta: QTensor) -> tuple[int, ...]:
    """``shape`` (possibly with leading batch axes) with the group axes as (groups, size)."""
    extra = len(shape) - meta.ndim
    g0, g1 = extra + meta.group_axis[0], extra + meta.group_axis[-1] + 1
    n = math.prod(shape[g0:g1])
    return shape[:g0] + (n // meta.group_size, meta.group_size) + shape[g1:]


def _unpacked(qvalue: jax.Array, batch: tuple[int, ...], meta: QTensor) -> jax.Array:
    if meta.fp8 is not None:
        return jnp.asarray(qvalue).reshape(batch + meta.shape)
    shape = meta.shape or (1,)
    return unpack(jnp.asarray(qvalue), meta.bits, shape[-1]).reshape(batch + meta.shape)


def _broadcast(param: jax.Array, batch: tuple[int, ...], meta: QTensor) -> jax.Array:
    """Reshapes scale/zero point to broadcast against the (grouped) values."""
    if meta.granularity == "tensor":
        return param.reshape(batch + (1,) * meta.ndim)
    if meta.granularity == "channel":
        dims = tuple(meta.shape[i] if i in meta.axis else 1 for i in range(meta.ndim))
        return param.reshape(batch + dims)
    return jnp.expand_dims(param, len(batch) + meta.group_axis[0] + 1)


def _meta(aux: tuple) -> QTensor:
    """A childless QTensor carrying only the static metadata."""
    return QTensor.tree_unflatten(aux, (None, None, None))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _values(qvalue: jax.Array, batch: tuple[int, ...], aux: tuple) -> jax.Array:
    return _unpacked(qvalue, batch, _meta(aux))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _dequantize(qvalue, scale, zero_point, batch: tuple[int, ...], aux: tuple, out_dtype: str
                ) -> jax.Array:
    meta = _meta(aux)
    vals = _unpacked(qvalue, batch, meta).astype(jnp.float32)
    if meta.granularity == "group":
        vals = vals.reshape(_group_view_shape(vals.shape, meta))
    if zero_point is not None:
        vals = vals - _broadcast(jnp.asarray(zero_point), batch, meta).astype(jnp.float32)
    out = vals * _broadcast(jnp.asarray(scale, jnp.float32), batch, meta)
    # A level may lie up to half a step beyond the dtype's range (or overflow float32):
    # clamp, so a finite input never comes back as +-inf.
    return clamp_cast(out.reshape(batch + meta.shape), out_dtype)


jax.tree_util.register_pytree_with_keys(
    QTensor,
    QTensor.tree_flatten_with_keys,
    QTensor.tree_unflatten,
    QTensor.tree_flatten,
)


def is_qtensor(x: Any) -> bool:
    """``is_leaf`` helper: True for `QTensor` nodes."""
    return isinstance(x, QTensor)
