"""Fold targets: where a per-input-channel scale of a kernel can be folded exactly.

AWQ and SmoothQuant rewrite ``x @ W`` as ``(x / s) @ (diag(s) W)`` with ``s > 0`` per
input channel. ``x / s`` costs nothing when it is folded into whatever produced ``x``:

* a norm, when ``x = normalized * scale [+ bias]`` with ``scale`` (and ``bias``) variable
  leaves indexing the contracted channels: divide ``scale`` and ``bias`` by ``s``;
* a previous kernel whose output reaches ``x`` only through ops that are positively
  homogeneous per channel (``f(s * y) = s * f(y)`` for ``s > 0``, channel by channel): bias
  adds, transposes and reshapes that keep the channels, ReLU (``max(y, 0)``), max/sum
  pooling over other axes, products with values that do not depend on it (the attention
  weights of ``softmax(QK) @ V``, a gate): divide its output columns and its bias by ``s``.

`fold_targets` walks a `flax_hooks.Program` abstractly (no compute) and tags every
activation axis that scales with a *source* (a kernel's output axes, or a per-channel
leaf multiplying an activation: a norm's scale). A source is a fold target when every
value it reaches ends in kernel contractions over all its channels -- each of those
kernels then takes the same ``s`` (q, k and v reading one pre-LN norm share it). A source
that reaches anything else (GELU, a residual add, the model output, an attention score, a
second read of the kernel) is blocked, with the first reason found.

Channels are numbered in the source's *channel space*: its output axes flattened row
major (``heads x head_dim`` for an attention value projection). A `FoldLeaf` lists a
leaf's axes in that order, so ``s.reshape([shape[a] for a in axes])`` indexes them.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxopt_lab.core import flax_hooks
from jaxopt_lab.core.jaxpr_walk import (REDUCE, VIEWS, Static, Walker, leaf_view, moved_axes,
                                       per_axis, reshape_groups)

Names = tuple[str, ...]
KINDS = ("norm", "kernel")

# f(s * y) = s * f(y) for s > 0, elementwise.
_HOMOGENEOUS_UNARY = frozenset({"neg", "abs", "copy", "copy_p", "convert_element_type",
                                "reduce_precision", "stop_gradient", "real"})
_LINEAR_COMBINE = frozenset({"add", "sub", "add_any", "max", "min"})
_WINDOW = frozenset({"reduce_window_max", "reduce_window_min", "reduce_window_sum"})
_CUMULATIVE = frozenset({"cumsum", "cummax", "cummin"})
OUTPUT = "its output reaches the model's output"


@dataclasses.dataclass(frozen=True)
class FoldLeaf:
    """A leaf and its axes that index a source's channels, in channel (row-major) order."""

    path: Names
    axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FoldTarget:
    """Where a kernel's per-input-channel scale ``s`` folds exactly.

    Attributes:
      kind: ``"norm"`` (a norm's scale and bias) or ``"kernel"`` (a previous kernel's output
        columns and bias).
      divide: the leaves to divide by ``s`` (the scale leaf or kernel first, then biases).
      kernels: every kernel reading the produced value, with its contracting axes in channel
        order: all of them take the same ``s`` (their rows multiplied by it).
      size: the number of channels.
    """

    kind: str
    divide: tuple[FoldLeaf, ...]
    kernels: tuple[FoldLeaf, ...]
    size: int


@dataclasses.dataclass(frozen=True)
class _Tag:
    source: int
    stride: int
    count: int


@dataclasses.dataclass(frozen=True)
class _Act:
    tags: tuple[_Tag | None, ...]
    why: str


@dataclasses.dataclass
class _Source:
    kind: str
    leaf: int
    axes: tuple[tuple[int, int, int], ...]  # (leaf axis, stride, count)
    size: int


Channels = tuple[tuple[int, int, int], ...]  # (leaf axis, stride, count) per channel axis


class _Walker(Walker):
    """The fold rules of the shared `jaxpr_walk.Walker`: sources, their readers and the
    leaves attached to them."""

    def __init__(self):
        super().__init__()
        self.sources: list[_Source] = []
        self.blocked: dict[int, str] = {}
        self.readers: dict[int, list[tuple[int, Channels]]] = defaultdict(list)
        self.attached: dict[int, list[tuple[int, Channels]]] = defaultdict(list)
        # kernel leaf -> per contraction: (source or None, reason, channels)
        self.inputs: dict[int, list[tuple[int | None, str, Channels]]] = defaultdict(list)

    def lost(self, rank: int, reason: str) -> _Act:
        return _Act((None,) * rank, reason)

    def block(self, tags: Sequence[Any], reason: str) -> None:
        for t in tags:
            if t is not None:
                self.blocked.setdefault(t.source, reason)

    def new_source(self, kind: str, leaf: int, pairs: list[tuple[int, int]]) -> list[_Tag]:
        """Tags for act axes given ``(leaf axis, size)`` in act-axis order."""
        sid = len(self.sources)
        tags, axes, stride = [], [], 1
        for la, size in reversed(pairs):
            tags.append(_Tag(sid, stride, size))
            axes.append((la, stride, size))
            stride *= size
        self.sources.append(_Source(kind, leaf, tuple(reversed(axes)), stride))
        return list(reversed(tags))

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def _tags_of(a: Any, rank: int) -> tuple:
        return a.tags if isinstance(a, _Act) else (None,) * rank

    # -- contractions -----------------------------------------------------------------
    def _dot(self, eqn, ins):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        dims = [(tuple(lc), tuple(lb)), (tuple(rc), tuple(rb))]
        shape = eqn.outvars[0].aval.shape
        acts = [isinstance(a, _Act) for a in ins]
        if not any(acts):
            return [Static.blank(len(shape))]
        views = [leaf_view(a) for a in ins]
        k = acts.index(False) if acts.count(True) == 1 else None
        if k is not None and views[k] is None:
            k = None
        if k is None:
            return [self._act_dot(ins, dims, shape)]
        a = 1 - k
        act, kv, leaf = ins[a], views[k], ins[k].pure
        (acon, abat), (kcon, kbat) = dims[a], dims[k]
        self._read(leaf, [act.tags[d] for d in acon], [kv[d] for d in kcon], act.why,
                   "a kernel contracts it over an axis the kernel broadcasts")
        self.block([act.tags[d] for d in abat], "a batched contraction with a kernel reads it")
        kfree = [d for d in range(len(kv)) if d not in kcon and d not in kbat]
        afree = [d for d in range(len(act.tags)) if d not in acon and d not in abat]
        fresh = iter(self.new_source("kernel", leaf, [(kv[d], eqn.invars[k].aval.shape[d])
                                                      for d in kfree if kv[d] is not None]))
        ktags = [None if kv[d] is None else next(fresh) for d in kfree]
        atags = [act.tags[d] for d in afree]
        tags = [None] * len(abat) + (atags + ktags if a == 0 else ktags + atags)
        return [_Act(tuple(tags), act.why)]

    def _act_dot(self, ins, dims, shape):
        """A contraction of two values (attention) or with a computed weight: linear in
        each operand, so the channels of one operand carry over when the other does not
        depend on any source; contracted channels are lost."""
        ranks = [len(a.tags) if isinstance(a, _Act) else len(a.leaves) for a in ins]
        tags = [self._tags_of(a, r) for a, r in zip(ins, ranks)]
        tagged = [i for i in (0, 1) if any(tags[i])]
        if len(tagged) > 1:
            reason = ("a product of two activations that both depend on it (an attention "
                      "score) reads it")
            for t in tags:
                self.block(t, reason)
            return _Act((None,) * len(shape), reason)
        for i in (0, 1):
            self.block([tags[i][d] for d in dims[i][0]],
                       "a product with another activation (an attention score) contracts it")
        out = [tags[0][d] or tags[1][e] for d, e in zip(dims[0][1], dims[1][1])]
        for i in (0, 1):
            con, bat = dims[i]
            out.extend(tags[i][d] for d in range(ranks[i]) if d not in con and d not in bat)
        why = next(a.why for a in ins if isinstance(a, _Act))
        return _Act(tuple(out), why)

    def _read(self, leaf: int, tags: list, kaxes: list, why: str, broadcast: str) -> None:
        """A kernel ``leaf`` contracts activation axes with ``tags`` over ``kaxes``."""
        found = {t.source for t in tags if t is not None}
        if not found:
            self.inputs[leaf].append((None, why, ()))
            return
        if len(found) > 1 or any(t is None for t in tags) or any(k is None for k in kaxes):
            reason = ("a kernel contracts it together with other values"
                      if all(k is not None for k in kaxes) else broadcast)
            self.block(tags, reason)
            self.inputs[leaf].append((None, reason, ()))
            return
        src = next(iter(found))
        chans = tuple((ka, t.stride, t.count) for ka, t in zip(kaxes, tags))
        self.readers[src].append((leaf, chans))
        self.inputs[leaf].append((src, "", chans))

    def _conv(self, eqn, ins):
        lhs, rhs = ins
        shape = eqn.outvars[0].aval.shape
        p = eqn.params
        dn = p["dimension_numbers"]
        kv = leaf_view(rhs)
        if not isinstance(lhs, _Act) or kv is None:
            for a in ins:
                if isinstance(a, _Act):
                    self.block(a.tags, "a convolution with a computed kernel reads it")
            if any(isinstance(a, _Act) for a in ins):
                return [_Act((None,) * len(shape), "a convolution with a computed kernel")]
            return [Static.blank(len(shape))]
        leaf = rhs.pure
        grouped = p["feature_group_count"] != 1 or p["batch_group_count"] != 1
        spatial = [t for d, t in enumerate(lhs.tags) if d != dn.lhs_spec[1]]
        self.block(spatial, "a convolution reads it over a spatial axis")
        if grouped:
            self.block(lhs.tags, "a grouped convolution reads it")
            self.inputs[leaf].append((None, "a grouped convolution", ()))
        else:
            self._read(leaf, [lhs.tags[dn.lhs_spec[1]]], [kv[dn.rhs_spec[1]]], lhs.why,
                       "a convolution broadcasts its kernel over it")
        tags: list[_Tag | None] = [None] * len(shape)
        out_axis = kv[dn.rhs_spec[0]]
        if out_axis is not None and not grouped:
            tags[dn.out_spec[1]] = self.new_source(
                "kernel", leaf, [(out_axis, shape[dn.out_spec[1]])])[0]
        return [_Act(tuple(tags), lhs.why)]

    # -- elementwise ------------------------------------------------------------------
    def _elementwise(self, eqn, ins):
        name = eqn.primitive.name
        rank = len(eqn.outvars[0].aval.shape)
        acts = [a for a in ins if isinstance(a, _Act)]
        if not acts:
            if name in _HOMOGENEOUS_UNARY and len(ins) == 1:
                return [ins[0]]
            full = [a for a in ins if len(a.leaves) == rank]
            leaves = tuple(frozenset().union(*(a.leaves[d] for a in full))
                           for d in range(rank))
            return [Static(leaves)]
        why = acts[0].why
        tagged = [a for a in acts if any(a.tags)]
        if not tagged:
            src = self._norm_source(name, ins, eqn.outvars[0].aval.shape)
            return [_Act(src if src is not None else (None,) * rank, why)]
        ref = tagged[0].tags
        if name in _HOMOGENEOUS_UNARY or (name == "integer_pow" and eqn.params["y"] == 1):
            if name == "convert_element_type" and not np.issubdtype(
                    eqn.params["new_dtype"], np.floating):
                self.block(ref, "a cast to a non-float type reads it")
                return [_Act((None,) * rank, "a cast")]
            return [ins[0]]
        if name in _LINEAR_COMBINE:
            attach, ok = [], True
            for a in ins:
                if isinstance(a, _Act):
                    ok = ok and a.tags == ref
                elif a.zero:
                    continue
                elif name in ("max", "min") or a.pure is None or len(a.leaves) != rank:
                    ok = False
                else:
                    chans = []
                    for d in range(rank):
                        pairs = a.leaves[d]
                        if (ref[d] is None) != (not pairs) or len(pairs) > 1:
                            ok = False
                            break
                        if pairs:
                            chans.append((next(iter(pairs))[1], ref[d].stride, ref[d].count))
                    attach.append((a.pure, tuple(chans)))
            if ok:
                for leaf, chans in attach:
                    self.attached[next(t for t in ref if t).source].append((leaf, chans))
                return [_Act(ref, why)]
            reason = (f"{name} mixes it with another activation (a residual add)"
                      if len(acts) > 1 else f"{name} with a constant or a leaf not on its "
                      "channels")
            for a in acts:
                self.block(a.tags, reason)
            return [_Act((None,) * rank, reason)]
        if name in ("mul", "div"):
            if len(tagged) > 1:
                for a in tagged:
                    self.block(a.tags, f"{name} of two values that both scale with it")
                return [_Act((None,) * rank, f"{name} of two scaled values")]
            if name == "div" and ins[1] is tagged[0]:
                self.block(ref, "it divides another value")
                return [_Act((None,) * rank, "a division by it")]
            return [_Act(ref, why)]
        reason = (f"{name} is not positively homogeneous (a GELU, tanh, exp... between it "
                  "and the kernel)")
        for a in tagged:
            self.block(a.tags, reason)
        return [_Act((None,) * rank, reason)]

    def _norm_source(self, name: str, ins, shape: Sequence[int]):
        """``activation * leaf`` (a norm's scale): a new source on the leaf's axes."""
        rank = len(shape)
        if name != "mul" or len(ins) != 2:
            return None
        stat = [a for a in ins if isinstance(a, Static)]
        if len(stat) != 1 or stat[0].pure is None or len(stat[0].leaves) != rank:
            return None
        if any(len(p) > 1 for p in stat[0].leaves):
            return None
        axes = [d for d, p in enumerate(stat[0].leaves) if p]
        return self._make_norm(stat[0], axes, shape) if axes else None

    def _make_norm(self, s: Static, axes: list[int], shape: Sequence[int]):
        rank = len(shape)
        fresh = self.new_source("norm", s.pure, [(next(iter(s.leaves[d]))[1], shape[d])
                                                 for d in axes])
        tags: list[_Tag | None] = [None] * rank
        for d, t in zip(axes, fresh):
            tags[d] = t
        return tuple(tags)

    # -- structure --------------------------------------------------------------------
    def _structural(self, eqn, ins):
        name, p = eqn.primitive.name, eqn.params
        x = ins[0]
        is_act, axes, empty = per_axis(x)
        out_shape = eqn.outvars[0].aval.shape

        def make(new_axes, pure=True):
            if is_act:
                return [_Act(tuple(new_axes), x.why)]
            return [Static(tuple(new_axes), x.zero, x.pure if pure else None)]

        def lose(tags, reason):
            if is_act:
                self.block(tags, reason)
            return [_Act((None,) * len(out_shape), reason)] if is_act else \
                [Static.blank(len(out_shape))]

        moved = moved_axes(eqn, axes, empty)
        if moved is not None:
            return make(moved)
        if name == "squeeze":
            drop = {d % len(axes) for d in p["dimensions"]}
            if is_act and any(axes[d] is not None for d in drop):
                return lose(axes, "a squeeze drops it")
            return make([a for d, a in enumerate(axes) if d not in drop])
        if name == "reshape":
            return self._reshape(eqn, x, axes, make, lose)
        if name in REDUCE:
            red = set(p["axes"])
            if is_act and any(axes[d] is not None for d in red):
                return lose(axes, f"{name} reduces over it")
            return make([a for d, a in enumerate(axes) if d not in red], pure=False)
        if not is_act:
            return None
        if name in _CUMULATIVE:
            return lose(axes, f"{name} runs along it") if axes[p["axis"]] else make(axes)
        if name in _WINDOW or name in ("pad", "slice"):
            for d, t in enumerate(axes):
                if t is None:
                    continue
                if name == "pad":
                    ok = tuple(p["padding_config"][d]) == (0, 0, 0) and \
                        isinstance(ins[1], Static) and ins[1].zero
                elif name == "slice":
                    ok = (p["start_indices"][d] == 0 and p["limit_indices"][d] == out_shape[d]
                          and (p["strides"] is None or p["strides"][d] == 1))
                else:
                    ok = (p["window_dimensions"][d] == 1 and p["window_strides"][d] == 1
                          and tuple(p["padding"][d]) == (0, 0))
                if not ok:
                    return lose(axes, f"{name} reads across it")
            return make(axes)
        return None

    def _reshape(self, eqn, x, axes, make, lose):
        old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        is_act, _, empty = per_axis(x)
        groups = reshape_groups(old, new)
        if groups is None:
            return lose(axes, "a reshape reads it")
        out = [empty] * len(new)
        if is_act and any(axes[d] is not None for d, s in enumerate(old) if s == 1):
            return lose(axes, "a reshape drops it")
        pure = True
        for go, gn in groups:
            if not is_act:
                if len(gn) == 1:
                    out[gn[0]] = frozenset().union(*(axes[d] for d in go))
                elif len(go) == 1 and not axes[go[0]]:
                    pass
                else:
                    pure = False
                continue
            tags = [axes[d] for d in go]
            if all(t is None for t in tags):
                continue
            merged = tags[-1]
            for t, nxt in zip(tags[-2::-1], tags[:0:-1]):
                ok = (t is not None and merged is not None and t.source == merged.source
                      and t.stride == nxt.stride * nxt.count)
                merged = _Tag(t.source, merged.stride, t.count * merged.count) if ok else None
            if merged is None:
                return lose(axes, "a reshape merges it with other axes")
            stride = merged.stride * merged.count
            for d in gn:
                stride //= new[d]
                out[d] = _Tag(merged.source, stride, new[d])
        return make(out, pure=pure)

    # -- the walk ---------------------------------------------------------------------
    def step(self, eqn, vals):
        name = eqn.primitive.name
        if name == "dot_general":
            return self._dot(eqn, vals)
        if name == "conv_general_dilated":
            return self._conv(eqn, vals)
        if name in _HOMOGENEOUS_UNARY or name in _LINEAR_COMBINE or name in (
                "mul", "div", "integer_pow") or (
                len(eqn.outvars) == 1 and len(vals) >= 1 and name not in VIEWS
                and name not in REDUCE and name not in _WINDOW and name not in _CUMULATIVE
                and name not in ("pad", "slice") and _is_elementwise(eqn)):
            return self._elementwise(eqn, vals)
        if len(eqn.outvars) == 1 and vals:
            return self._structural(eqn, vals)
        return None


def _is_elementwise(eqn) -> bool:
    """Same-shape operands and result (or rank-0 operands): an elementwise op."""
    shape = eqn.outvars[0].aval.shape
    return all(getattr(v.aval, "shape", ()) in (shape, ()) for v in eqn.invars)


def _covers(chans: Channels, size: int) -> bool:
    """The channel axes enumerate ``size`` channels once each, row major in order."""
    stride = 1
    for _, s, c in reversed(sorted(chans, key=lambda x: -x[1])):
        if s != stride:
            return False
        stride *= c
    return stride == size


def _ordered(chans: Channels) -> tuple[int, ...]:
    return tuple(a for a, _, _ in sorted(chans, key=lambda x: -x[1]))


def fold_targets(program: flax_hooks.Program) -> dict[int, FoldTarget | str]:
    """For every kernel leaf read by a contraction: its `FoldTarget`, or why there is none.

    Args:
      program: from `flax_hooks.trace`.

    Returns:
      ``{kernel leaf index: FoldTarget | reason}`` (leaf indices into ``program.paths``).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxopt_lab.core import flax_hooks, foldflow
      >>> model = nn.Sequential([nn.LayerNorm(), nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((1, 3))
      >>> program = flax_hooks.trace(model, model.init(jax.random.PRNGKey(0), x), x)
      >>> found = foldflow.fold_targets(program)
      >>> [found[i].kind for i in sorted(found)]
      ['norm', 'kernel']
    """
    walker = _Walker()
    for o in walker.walk(program):
        if isinstance(o, _Act):
            walker.block(o.tags, OUTPUT)
    names = [flax_hooks.path_names(p) for p in program.paths]

    def check(sid: int) -> FoldTarget | str:
        if sid in walker.blocked:
            return walker.blocked[sid]
        src = walker.sources[sid]
        owners = [i for i, s in enumerate(walker.sources) if s.leaf == src.leaf]
        if walker.leaf_uses[src.leaf] != 1 or len(owners) != 1:
            return f"{'/'.join(names[src.leaf])} is read by more than one op"
        for leaf, chans in walker.attached[sid]:
            if walker.leaf_uses[leaf] != 1:
                return f"{'/'.join(names[leaf])} is read by more than one op"
            if not _covers(chans, src.size):
                return f"{'/'.join(names[leaf])} does not index its channels one to one"
        kernels = []
        for leaf, chans in walker.readers[sid]:
            if walker.leaf_uses[leaf] != 1:
                return f"a kernel reading it, {'/'.join(names[leaf])}, is read by more ops"
            if not _covers(chans, src.size):
                return (f"{'/'.join(names[leaf])} contracts only part of its channels or "
                        "repeats them")
            kernels.append(FoldLeaf(names[leaf], _ordered(chans)))
        divide = [FoldLeaf(names[src.leaf], _ordered(src.axes))]
        divide += [FoldLeaf(names[leaf], _ordered(chans))
                   for leaf, chans in walker.attached[sid]]
        return FoldTarget(src.kind, tuple(divide), tuple(kernels), src.size)

    checked: dict[int, FoldTarget | str] = {}
    out: dict[int, FoldTarget | str] = {}
    for leaf, reads in walker.inputs.items():
        if len(reads) != 1:
            out[leaf] = f"the kernel is read by {len(reads)} contractions"
            continue
        sid, why, _ = reads[0]
        if sid is None:
            out[leaf] = why
            continue
        if sid not in checked:
            checked[sid] = check(sid)
        out[leaf] = checked[sid]
    return out


def channel_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """The shape ``s`` takes on ``axes`` (channel order) of a leaf of ``shape``."""
    return tuple(int(shape[a]) for a in axes)


def broadcast_scale(s: Any, shape: Sequence[int], axes: Sequence[int]) -> Any:
    """``s`` (channel space, flat) as an array broadcasting against a leaf of ``shape``."""
    import jax.numpy as jnp

    s = jnp.reshape(s, channel_shape(shape, axes))
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    s = jnp.transpose(s, order)
    full = [1] * len(shape)
    for a in axes:
        full[a] = int(shape[a])
    return jnp.reshape(s, full)


def rows_to_channels(s_rows: Any, shape: Sequence[int], contracting: Sequence[int],
                     axes: Sequence[int]) -> Any:
    """A kernel's per-row scale (rows: its ``contracting`` axes flattened in that order)
    in channel order (its contracting axes in the target's order ``axes``)."""
    import jax.numpy as jnp

    s = jnp.reshape(s_rows, channel_shape(shape, contracting))
    perm = [list(contracting).index(a) for a in axes]
    return jnp.reshape(jnp.transpose(s, perm), (-1,))


def fold_scale(tree: Any, target: FoldTarget, s: Any, *, kernels: bool = True) -> Any:
    """Folds a per-channel scale into ``tree``: the target's ``divide`` leaves are divided
    by ``s`` and (``kernels=True``) the rows of every kernel sharing it multiplied by ``s``,
    so the float model computes the same function.

    Args:
      tree: the variables the map was traced with, or a subtree of them (a leaf matches
        a target path that ends with the leaf's names).
      target: from `ModelMap.fold_target`.
      s: positive scales in the target's channel order, ``(target.size,)``.
      kernels: also multiply the kernels' rows (False: the caller scales them itself, e.g.
        AWQ, which quantizes ``diag(s) W``).

    Returns:
      ``tree`` with those leaves rescaled (same structure).

    Raises:
      ValueError: for ``s`` of the wrong shape or not positive and finite, or a target leaf
        missing from ``tree``.

    Examples:
      >>> import jax.numpy as jnp
      >>> t = FoldTarget("norm", (FoldLeaf(("ln", "scale"), (0,)),),
      ...                (FoldLeaf(("dense", "kernel"), (0,)),), 2)
      >>> tree = {"ln": {"scale": jnp.ones(2)}, "dense": {"kernel": jnp.ones((2, 3))}}
      >>> out = fold_scale(tree, t, jnp.array([2.0, 4.0]))
      >>> out["ln"]["scale"].tolist(), out["dense"]["kernel"][:, 0].tolist()
      ([0.5, 0.25], [2.0, 4.0])
    """
    import jax
    import jax.numpy as jnp

    s = jnp.asarray(s, jnp.float32)
    where = "/".join(target.divide[0].path)
    if s.shape != (target.size,):
        raise ValueError(f"fold_scale into {where}: s of shape {s.shape}, expected "
                         f"({target.size},)")
    if not isinstance(s, jax.core.Tracer) and not bool(((s > 0) & jnp.isfinite(s)).all()):
        raise ValueError(f"fold_scale into {where}: s must be positive and finite")
    todo = {fl.path: (fl, -1.0) for fl in target.divide}
    if kernels:
        todo.update({fl.path: (fl, 1.0) for fl in target.kernels})
    seen = set()

    def one(path, leaf):
        names = flax_hooks.path_names(path)
        hits = [k for k in todo if names and k[len(k) - len(names):] == names]
        if len(hits) != 1:
            return leaf
        fl, sign = todo[hits[0]]
        seen.add(hits[0])
        b = broadcast_scale(s, np.shape(leaf), fl.axes)
        x = jnp.asarray(leaf)
        return (x / b if sign < 0 else x * b).astype(x.dtype)

    out = jax.tree_util.tree_map_with_path(one, tree)
    missing = sorted("/".join(k) for k in set(todo) - seen)
    if missing:
        raise ValueError(f"fold_scale: the target's leaves {missing} are not in the tree")
    return out
