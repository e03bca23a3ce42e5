"""Frozen, checked per-leaf settings of the one-shot methods.

`GPTQSettings` for `jaxopt_lab.oneshot.gptq`, `WandaSettings` for
`jaxopt_lab.oneshot.wanda`, `SparseGPTSettings` for `jaxopt_lab.oneshot.sparsegpt`. Each
method builds one record from its keyword arguments; a ``where`` callable (or mask tree)
may give a leaf its own record, or a mapping of some fields replaced in the call's record.
A record checks each field on its own; what depends on the kernel (a group size dividing
``K``, ``K`` divisible by ``m``) or on several fields (sparsity *or* ``n:m``) is checked
per leaf by the method, naming the leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxopt_lab._select import SettingsRecord
from jaxopt_lab.quant.qtensor import INT_BITS

SCOPES = ("output", "layer")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_bool(label: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{label} must be a bool, got {v!r}")
    return bool(v)


def _check_bits(bits: Any, optional: bool) -> int | None:
    if optional and bits is None:
        return None
    if isinstance(bits, (bool, np.bool_)) or not _is_int(bits) or bits not in INT_BITS:
        raise ValueError(f"bits must be one of {INT_BITS}{' or None' if optional else ''}, "
                         f"got {bits!r}")
    return int(bits)


def _check_group_size(g: Any) -> int | None:
    if g is None:
        return None
    if not _is_int(g) or g < 1:
        raise ValueError(f"group_size must be None or a positive int, got {g!r}")
    return int(g)


def _check_damp(damp: Any) -> float:
    if (isinstance(damp, bool) or not isinstance(damp, (int, float)) or math.isnan(damp)
            or damp < 0):
        raise ValueError(f"damp must be a number >= 0 (inf allowed), got {damp!r}")
    return damp


def _check_block_size(b: Any) -> int:
    if not _is_int(b) or b < 1:
        raise ValueError(f"block_size must be a positive int, got {b!r}")
    return int(b)


def _check_sparsity(sparsity: Any) -> Any:
    if sparsity is None:
        return None
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a Python number, got {sparsity!r}")
    if not 0.0 <= float(sparsity) <= 1.0:  # NaN fails too
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return sparsity


def _check_nm(n: Any, m: Any) -> tuple[int | None, int | None]:
    for label, v in (("n", n), ("m", m)):
        if v is not None and not _is_int(v):
            raise ValueError(f"{label} must be None or an int, got {v!r}")
    if (n is not None and m is not None and not 0 <= n <= m) or (m is not None and m < 1):
        raise ValueError(f"need integers 0 <= n <= m, m >= 1; got {n}:{m}")
    return (None if n is None else int(n)), (None if m is None else int(m))


def _set(record: Any, **values: Any) -> None:
    for k, v in values.items():
        object.__setattr__(record, k, v)  # frozen: normalised once, at construction


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQSettings(SettingsRecord):
    """GPTQ of one kernel (the keyword arguments of `jaxopt_lab.oneshot.gptq_matrix`).

    Attributes:
      bits: 2, 3, 4 or 8.
      group_size: None (one scale per output column) or rows per scale group.
      symmetric, act_order, static_groups, clip_search: bools, as in `gptq_matrix`.
      damp: dampening relative to the mean diagonal of ``H``, ``>= 0`` (``inf``: RTN).
      block_size: rows per lazy batch update, ``>= 1``.

    Raises:
      ValueError: naming the bad value.

    Examples:
      >>> from jaxopt_lab.oneshot import GPTQSettings
      >>> GPTQSettings(bits=3, group_size=64).damp
      0.01
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    act_order: bool = False
    static_groups: bool = False
    clip_search: bool = False
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        _set(self, bits=_check_bits(self.bits, optional=False),
             group_size=_check_group_size(self.group_size),
             symmetric=_check_bool("symmetric", self.symmetric),
             act_order=_check_bool("act_order", self.act_order),
             static_groups=_check_bool("static_groups", self.static_groups),
             clip_search=_check_bool("clip_search", self.clip_search),
             damp=_check_damp(self.damp), block_size=_check_block_size(self.block_size))


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandaSettings(SettingsRecord):
    """Wanda of one kernel (the keyword arguments of `jaxopt_lab.oneshot.wanda_matrix`).

    Attributes:
      sparsity: fraction pruned, a Python number in ``[0, 1]``, or None with ``n:m``.
      n, m: keep ``n`` of every ``m`` inputs of each output (both or neither).
      scope: ``"output"`` (per output column, the paper) or ``"layer"``.

    Raises:
      ValueError: naming the bad value.

    Examples:
      >>> from jaxopt_lab.oneshot import WandaSettings
      >>> WandaSettings(n=2, m=4).scope
      'output'
    """

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    scope: str = "output"

    def __post_init__(self) -> None:
        n, m = _check_nm(self.n, self.m)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        _set(self, sparsity=_check_sparsity(self.sparsity), n=n, m=m)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTSettings(SettingsRecord):
    """SparseGPT of one kernel (the keyword arguments of
    `jaxopt_lab.oneshot.sparsegpt_matrix`).

    Attributes:
      sparsity: fraction pruned, a Python number in ``[0, 1]``, or None with ``n:m``.
      n, m: keep ``n`` of every ``m`` inputs of each output (both or neither).
      bits: quantize the kept weights jointly (2, 3, 4 or 8), or None.
      group_size, symmetric, damp, block_size: as in `GPTQSettings`.

    Raises:
      ValueError: naming the bad value.

    Examples:
      >>> from jaxopt_lab.oneshot import SparseGPTSettings
      >>> SparseGPTSettings(sparsity=0.5, bits=4).block_size
      128
    """

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        n, m = _check_nm(self.n, self.m)
        _set(self, sparsity=_check_sparsity(self.sparsity), n=n, m=m,
             bits=_check_bits(self.bits, optional=True),
             group_size=_check_group_size(self.group_size),
             symmetric=_check_bool("symmetric", self.symmetric),
             damp=_check_damp(self.damp), block_size=_check_block_size(self.block_size))
