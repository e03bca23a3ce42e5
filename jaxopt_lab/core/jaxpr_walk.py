"""The abstract walk over a traced model's jaxpr, shared by `channels` and `foldflow`.

Both analyses interpret a `flax_hooks.Program` abstractly (no compute). Every value is
either a `Static` (computed from variable leaves and constants only: per axis, the
``(leaf, leaf axis)`` pairs it indexes) or an *activation* (it depends on the call's
inputs): the analysis's own frozen dataclass with a ``tags`` tuple, one entry per axis,
``None`` where the axis carries nothing the analysis follows.

`Walker.eval` steps through the equations once: it binds constants, literals and inputs,
steps into sub-jaxprs that run once per call (nested ``jit``, ``custom_jvp``,
``custom_vjp``: `flax_hooks.sub_jaxpr`), counts the ops reading each leaf, asks the
analysis's `Walker.step` for each other equation's outputs and, where ``step`` has no rule,
loses the activations' tags with the reason ``"<op> reads it"``.

Examples:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from jaxopt_lab.core import flax_hooks, jaxpr_walk
  >>> model = nn.Dense(2)
  >>> x = jnp.ones((1, 3))
  >>> program = flax_hooks.trace(model, model.init(jax.random.PRNGKey(0), x), x)
  >>> jaxpr_walk.Static.blank(2)
  Static(leaves=(frozenset(), frozenset()), zero=False, pure=None)
  >>> jaxpr_walk.reshape_groups((2, 3, 4), (6, 4))
  [([0, 1], [0]), ([2], [1])]
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import jax.extend.core as jcore
import numpy as np

from jaxopt_lab.core import flax_hooks

# Ops that only view their operand (a leaf read through them is still the same read).
VIEWS = frozenset({"transpose", "broadcast_in_dim", "reshape", "squeeze", "expand_dims",
                   "convert_element_type", "copy", "copy_p", "reduce_precision"})
REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min"})
MODEL_INPUT = "it is the model's input"


@dataclasses.dataclass(frozen=True)
class Static:
    """A value computed from variable leaves and constants only.

    ``leaves[d]``: the (leaf, leaf axis) pairs axis ``d`` indexes one to one; ``pure``:
    the leaf index when the value is a view of that leaf (casts, transposes, reshapes,
    broadcasts); ``zero``: the value is zero (wherever its zeroable leaves are).
    """

    leaves: tuple[frozenset, ...]
    zero: bool = False
    pure: int | None = None

    @classmethod
    def blank(cls, rank: int) -> Static:
        """A value of rank ``rank`` that indexes no leaf and is not known to be zero."""
        return cls(tuple(frozenset() for _ in range(rank)))


def leaf_view(s: Any) -> list[int | None] | None:
    """Operand axis -> leaf axis for a pure view of one leaf (None for added axes); None
    when ``s`` is not such a view."""
    if not isinstance(s, Static) or s.pure is None:
        return None
    out = []
    for pairs in s.leaves:
        if len(pairs) > 1:
            return None
        out.append(next(iter(pairs))[1] if pairs else None)
    return out


def per_axis(x: Any) -> tuple[bool, list[Any], Any]:
    """``(is_act, entries, empty)``: whether ``x`` is an activation, its per-axis entries
    (tags, or a `Static`'s leaf pairs) and the entry of an axis that carries nothing."""
    if isinstance(x, Static):
        return False, list(x.leaves), frozenset()
    return True, list(x.tags), None


def moved_axes(eqn, axes: Sequence[Any], empty: Any) -> list[Any] | None:
    """Per-axis entries after a ``transpose``, ``broadcast_in_dim`` or ``expand_dims``
    (new axes get ``empty``); None for any other op."""
    name, p = eqn.primitive.name, eqn.params
    if name == "transpose":
        return [axes[d] for d in p["permutation"]]
    if name == "broadcast_in_dim":
        out = [empty] * len(eqn.outvars[0].aval.shape)
        for d, o in enumerate(p["broadcast_dimensions"]):
            out[o] = axes[d]
        return out
    if name == "expand_dims":
        out = list(axes)
        for d in sorted(p["dimensions"]):
            out.insert(d, empty)
        return out
    return None


def reshape_groups(old: Sequence[int], new: Sequence[int]):
    """Aligned groups ``(old axes, new axes)`` of equal size, size-1 axes left out; None
    when the reshape does not split into such groups."""
    o = [i for i, s in enumerate(old) if s != 1]
    n = [j for j, s in enumerate(new) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(o) and j < len(n):
        go, gn = [o[i]], [n[j]]
        po, pn = old[o[i]], new[n[j]]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn and i < len(o):
                go.append(o[i])
                po *= old[o[i]]
                i += 1
            elif pn < po and j < len(n):
                gn.append(n[j])
                pn *= new[n[j]]
                j += 1
            else:
                return None
        groups.append((go, gn))
    return groups if i == len(o) and j == len(n) else None


def _rank(v) -> int:
    return len(getattr(v.aval, "shape", ()))


def _literal(v) -> Static:
    val = np.asarray(v.val)
    return Static(tuple(frozenset() for _ in range(val.ndim)),
                  bool(val.size) and not np.any(val))


def _const(c) -> Static:
    # A device array (it has an aval) is not read back: it is taken as not zero.
    arr = None if hasattr(c, "aval") and not isinstance(c, np.ndarray) else np.asarray(c)
    zero = arr is not None and arr.size > 0 and not np.any(arr)
    return Static(tuple(frozenset() for _ in range(len(np.shape(c)))), zero)


class Walker:
    """The walk; an analysis subclasses it and defines `step`, `block` and `lost`.

    Attributes:
      leaf_uses: per leaf index, how many ops other than views read it (sub-jaxpr calls
        not counted: the ops inside them are).
    """

    def __init__(self, leaf_uses: dict[int, int] | None = None):
        self.leaf_uses = defaultdict(int) if leaf_uses is None else leaf_uses

    def step(self, eqn, vals: list[Any]) -> list[Any] | None:
        """The outputs of ``eqn`` (not a sub-jaxpr call) given its inputs, or None when
        the analysis has no rule for it."""
        raise NotImplementedError

    def block(self, tags: Iterable[Any], reason: str) -> None:
        """Records that ``tags`` cannot be followed further, and why."""
        raise NotImplementedError

    def lost(self, rank: int, reason: str) -> Any:
        """An activation of rank ``rank`` whose axes carry nothing (``reason``: why)."""
        raise NotImplementedError

    def walk(self, program: flax_hooks.Program, *, zeroable: Iterable[int] = ()) -> list:
        """Evaluates the whole program: its variable leaves are `Static` views of
        themselves (``zero`` for those in ``zeroable``), its other inputs activations."""
        zeroable = set(zeroable)
        jaxpr = program.closed.jaxpr
        ins: list[Any] = []
        for i, v in enumerate(jaxpr.invars):
            rank = len(v.aval.shape)
            if i < program.n_vars:
                ins.append(Static(tuple(frozenset({(i, d)}) for d in range(rank)),
                                  i in zeroable, i))
            else:
                ins.append(self.lost(rank, MODEL_INPUT))
        return self.eval(jaxpr, program.closed.consts, ins)

    def eval(self, jaxpr, consts, ins: Sequence[Any]) -> list[Any]:
        """The abstract values of ``jaxpr``'s outputs given its inputs ``ins``."""
        env: dict[Any, Any] = {}

        def read(v):
            return _literal(v) if isinstance(v, jcore.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _const(c)
        for v, a in zip(jaxpr.invars, ins):
            env[v] = a
        for eqn in jaxpr.eqns:
            vals = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            sub = flax_hooks.sub_jaxpr(eqn)
            if sub is not None:
                outs = self.eval(sub[0], sub[1], vals)
            else:
                if name not in VIEWS:
                    for a in vals:
                        if isinstance(a, Static) and a.pure is not None:
                            self.leaf_uses[a.pure] += 1
                outs = self.step(eqn, vals)
            if outs is None:
                why = f"{name} reads it"
                acts = [a for a in vals if not isinstance(a, Static)]
                for a in acts:
                    self.block(a.tags, why)
                outs = [self.lost(_rank(v), why) if acts else Static.blank(_rank(v))
                        for v in eqn.outvars]
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]
