"""Frozen, checked per-leaf settings of the mask functions.

`SparsitySettings` for `jaxopt_lab.magnitude_mask`, `jaxopt_lab.random_mask`,
`jaxopt_lab.saliency_mask` and `jaxopt_lab.channel_mask`; `NMSettings` for
`jaxopt_lab.nm_mask`. Each function builds one record from its keyword arguments; a
``where`` callable (or mask tree) may give a leaf its own record, or a mapping of some
fields replaced in the call's record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxopt_lab._select import SettingsRecord


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsitySettings(SettingsRecord):
    """The fraction of a leaf's entries (or channels) to prune.

    Attributes:
      sparsity: a scalar in ``[0, 1]``; a traced value (a schedule's, under ``jit``) is
        checked by nothing and kept as it is (such a record is not hashable).

    Raises:
      ValueError: naming the value, for a concrete sparsity that is not a scalar in
        ``[0, 1]`` (NaN included).

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> tree = {"a": jnp.arange(1.0, 5.0).reshape(2, 2), "b": jnp.ones((2, 2))}
      >>> where = {"a": jol.SparsitySettings(sparsity=0.75), "b": True}
      >>> masks = jol.magnitude_mask(tree, 0.5, where=where)
      >>> int(masks["a"].sum()), int(masks["b"].sum())
      (1, 2)
    """

    sparsity: Any

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, jax.core.Tracer):
            return
        try:
            value = np.asarray(self.sparsity)
            ok = value.shape == () and 0.0 <= float(value) <= 1.0  # NaN fails too
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"sparsity must be a scalar in [0, 1], got {self.sparsity!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NMSettings(SettingsRecord):
    """An N:M pattern: every ``m`` consecutive entries along the contraction keep ``n``.

    Attributes:
      n: entries kept per group, ``0 <= n <= m``.
      m: group size, ``>= 1``.
      axis: the grouped axis when the leaf has no model map entry (default -2: the input
        features of a Flax ``(in, out)`` Dense kernel). Set in a leaf's record, it wins
        over the map.

    Raises:
      TypeError: naming the value, for an ``n`` or ``m`` that is not an int (as
        `jaxopt_lab.nm_mask` always did).
      ValueError: naming the values, for ``n > m``, ``n < 0``, ``m < 1`` or an axis that
        is not an int.

    Examples:
      >>> import jax.numpy as jnp, jaxopt_lab as jol
      >>> tree = {"a": jnp.arange(1.0, 9.0).reshape(8, 1), "b": jnp.ones((8, 1))}
      >>> masks = jol.nm_mask(tree, n=2, m=4, where={"a": jol.NMSettings(n=1, m=4),
      ...                                           "b": True})
      >>> int(masks["a"].sum()), int(masks["b"].sum())
      (2, 4)
    """

    n: int = 2
    m: int = 4
    axis: int = -2

    def __post_init__(self) -> None:
        for label, v in (("n", self.n), ("m", self.m)):
            if not _is_int(v):
                raise TypeError(f"{label} must be an int, got {v!r}")
        if self.m < 1 or self.n < 0 or self.n > self.m:
            raise ValueError(f"need 0 <= n <= m and m >= 1, got n={self.n}, m={self.m}")
        if not _is_int(self.axis):
            raise ValueError(f"axis must be an int, got {self.axis!r}")
        for label in ("n", "m", "axis"):
            object.__setattr__(self, label, int(getattr(self, label)))
