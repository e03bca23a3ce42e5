"""`QuantSettings` (`jaxopt_lab.quantize`) and `LSQSettings` (`jaxopt_lab.lsq_init`): the
frozen, checked settings of one leaf.

`jaxopt_lab.quantize` and `jaxopt_lab.fake_quant` build one record from their keyword
arguments; a ``where`` callable (or mask tree) may give a leaf its own record (or a
mapping of some fields, replaced in the call's record).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxopt_lab._select import SettingsRecord
from jaxopt_lab.quant.qtensor import FP8_DTYPES, GRANULARITIES, INT_BITS

SCALE_DTYPES = ("float32", "bfloat16")


def dtype_name(d: Any) -> str | None:
    """``jnp.dtype(d).name``, or None when ``d`` names no dtype."""
    try:
        return jnp.dtype(d).name
    except TypeError:
        return None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSettings(SettingsRecord):
    """How one leaf is quantized (the keyword arguments of `jaxopt_lab.quantize`).

    Attributes:
      bits: 2, 3, 4 or 8 (8 for fp8).
      granularity: ``"tensor"``, ``"channel"`` or ``"group"``.
      group_size: elements per group, a positive int for ``granularity="group"``.
      symmetric: zero point 0, or an ``int8`` zero point with the full range.
      axis: the channel axis or axes (an int or a tuple of ints; a list becomes a tuple).
      dtype: None for integer codes, or ``"float8_e4m3fn"`` / ``"float8_e5m2"`` (any
        spelling ``jnp.dtype`` reads is stored by name).
      scale_dtype: ``"float32"`` or ``"bfloat16"`` (stored by name).

    Raises:
      ValueError: naming the bad value, when the record is built (also by
        ``dataclasses.replace``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxopt_lab as jol
      >>> first = jol.QuantSettings(bits=8)
      >>> where = lambda path, leaf: first if "0" in jax.tree_util.keystr(path) else True
      >>> q = jol.quantize({"l0": jnp.ones((4, 4)), "l1": jnp.ones((4, 4))}, bits=4,
      ...                  where=where)
      >>> q["l0"].bits, q["l1"].bits
      (8, 4)
    """

    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    axis: int | tuple[int, ...] = -1
    dtype: str | None = None
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 -- frozen
        if self.dtype is not None:
            if dtype_name(self.dtype) not in FP8_DTYPES:
                raise ValueError(f"dtype must be one of {FP8_DTYPES}, got {self.dtype!r}")
            if self.bits != 8 or not self.symmetric:
                raise ValueError(f"fp8 quantization is symmetric 8-bit, got "
                                 f"bits={self.bits!r}, symmetric={self.symmetric!r}")
            set_("dtype", dtype_name(self.dtype))
        if isinstance(self.bits, (bool, np.bool_)) or self.bits not in INT_BITS:
            raise ValueError(f"bits must be one of {INT_BITS}, got {self.bits!r}")
        set_("bits", int(self.bits))
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, "
                             f"got {self.granularity!r}")
        g = self.group_size
        if self.granularity == "group" and (not _is_int(g) or g <= 0):
            raise ValueError(f"granularity='group' needs a positive int group_size, got {g!r}")
        if _is_int(g):
            set_("group_size", int(g))
        axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
        if not axes or not all(_is_int(a) for a in axes):
            raise ValueError(f"axis must be an int or a tuple of ints, got {self.axis!r}")
        set_("axis", tuple(int(a) for a in axes) if isinstance(self.axis, (tuple, list))
             else int(self.axis))
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        set_("symmetric", bool(self.symmetric))
        if dtype_name(self.scale_dtype) not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, "
                             f"got {self.scale_dtype!r}")
        set_("scale_dtype", dtype_name(self.scale_dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSQSettings(SettingsRecord):
    """LSQ of one leaf (the keyword arguments of `jaxopt_lab.lsq_init` and
    `jaxopt_lab.lsq_fake_quant`; give both the same ``where``).

    Attributes:
      bits: 2, 3, 4 or 8.
      granularity: ``"tensor"`` (one step) or ``"channel"`` (one step per index of
        ``axis``, or per real output element with a model map's layout).
      axis: the channel axis (an int or a tuple of ints).
      signed: signed codes ``[-2**(b-1), 2**(b-1) - 1]`` or unsigned ``[0, 2**b - 1]``.

    Raises:
      ValueError: naming the bad value.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> where = {"w": jol.LSQSettings(bits=4, granularity="channel"), "b": False}
      >>> jol.lsq_init({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, where=where)["w"].shape
      (1, 3)
    """

    bits: int = 8
    granularity: str = "tensor"
    axis: int | tuple[int, ...] = -1
    signed: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, (bool, np.bool_)) or self.bits not in INT_BITS:
            raise ValueError(f"bits must be one of {INT_BITS}, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(f"granularity must be 'tensor' or 'channel' (LSQ has no groups), "
                             f"got {self.granularity!r}")
        axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
        if not axes or not all(_is_int(a) for a in axes):
            raise ValueError(f"axis must be an int or a tuple of ints, got {self.axis!r}")
        if not isinstance(self.signed, (bool, np.bool_)):
            raise ValueError(f"signed must be a bool, got {self.signed!r}")
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "axis", tuple(int(a) for a in axes)
                           if isinstance(self.axis, (tuple, list)) else int(self.axis))
        object.__setattr__(self, "signed", bool(self.signed))
