"""Channel flow: which kernel reads which kernel's output channels, read from the jaxpr.

`channel_flow` walks a `flax_hooks.Program` abstractly (no compute) and follows every
output channel axis of every kernel contraction (``dot_general`` or convolution reading a
variable leaf) through the ops that keep channels apart -- elementwise ops, activations,
bias adds, BatchNorm arithmetic, pooling over other axes, transposes, channels-last
flattens -- to the next kernel contraction that reduces it. The result holds:

* `Edge` s ``producer axis -> consumer axis``: the consumer kernel's contracting axis
  whose rows read the producer's channels (``outer x channels x inner`` when a flatten
  merged the channel axis with others);
* the leaves *attached* to each producer channel axis (a bias, a BatchNorm's scale, bias,
  mean and variance): their axis indexes the same channels;
* for each channel axis that cannot be followed, why: it reaches the model's output, a
  residual add mixes it with another layer's channels, attention or a reshape that splits
  it reads it, a reduction over it...

It also says whether a *dead* channel (its kernel slice all zero, and its attached
``zeroable`` leaves zeroed) is exactly zero where the consumer reads it (``max(x, 0)``,
``gelu``, ``tanh`` keep zero; ``sigmoid`` or an added constant do not). Values are
assumed finite (``0 * inf`` is not zero).

Reading the ops, not the layers, is what lets channel compaction (`jaxopt_lab.compact`)
handle any chain of linen or NNX Dense/Conv layers without knowing the model's classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from jaxopt_lab.core import flax_hooks
from jaxopt_lab.core.jaxpr_walk import (REDUCE, Static, Walker, leaf_view, moved_axes,
                                       per_axis, reshape_groups)

Channel = tuple[int, int]  # (kernel leaf index, leaf axis)
OUTPUT = "it is (part of) the model's output"

# Elementwise primitives (operands of equal shape, or rank-0 scalars).
_ZERO_UNARY = frozenset({
    "neg", "abs", "sign", "tanh", "sin", "tan", "sqrt", "cbrt", "erf", "erf_inv", "expm1",
    "log1p", "convert_element_type", "copy", "copy_p", "square", "reduce_precision", "floor",
    "ceil", "round", "integer_pow", "real", "asinh", "atanh", "asin", "atan", "sinh"})
_OTHER_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "max", "min", "pow", "exp", "exp2", "log", "logistic", "cos",
    "rsqrt", "erfc", "cosh", "acos", "acosh", "atan2", "select_n", "clamp", "ge", "gt", "le",
    "lt", "eq", "ne", "and", "or", "not", "xor", "is_finite", "nextafter", "rem", "add_any",
    "stop_gradient"})
_ELEMENTWISE = _ZERO_UNARY | _OTHER_ELEMENTWISE
_WINDOW = frozenset({"reduce_window_max", "reduce_window_min", "reduce_window_sum",
                     "cumsum", "cummax", "cummin"})


@dataclasses.dataclass(frozen=True)
class Tag:
    """An activation axis that indexes a producer's output channels.

    The axis has ``outer * channels * inner`` entries (a channels-last flatten merges
    spatial positions in ``outer``); ``zero`` says a dead channel is exactly zero there.
    """

    producer: int
    axis: int
    outer: int = 1
    inner: int = 1
    zero: bool = True

    @property
    def channel(self) -> Channel:
        return (self.producer, self.axis)

    def key(self) -> tuple:
        return (self.producer, self.axis, self.outer, self.inner)


@dataclasses.dataclass(frozen=True)
class _Act:
    """A value that depends on the call's inputs: per axis, a `Tag` or None."""

    tags: tuple[Tag | None, ...]


@dataclasses.dataclass(frozen=True)
class Edge:
    """``producer``'s output ``axis`` feeds ``consumer``'s contracting ``consumer_axis``.

    The consumer axis has ``outer * channels * inner`` entries, channels in the middle.
    ``zero``: a dead producer channel is exactly zero there.
    """

    producer: int
    axis: int
    consumer: int
    consumer_axis: int
    outer: int
    inner: int
    zero: bool


@dataclasses.dataclass
class ChannelFlow:
    """What `channel_flow` found (leaves are indices into ``program.paths``).

    Attributes:
      kernels: every kernel leaf, in call order, with its output (channel) axes.
      uses: how many contractions read each kernel leaf.
      edges: per producer channel, the consumers reading it.
      attached: per producer channel, the ``(leaf, axis)`` pairs indexing the same channels.
      blocked: per producer channel that cannot be followed, the first reason.
      outputs: the producer channels that reach the model's output.
      leaf_uses: per leaf, how many ops (other than views) read it.
    """

    kernels: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    uses: dict[int, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    edges: dict[Channel, list[Edge]] = dataclasses.field(
        default_factory=lambda: defaultdict(list))
    attached: dict[Channel, set[Channel]] = dataclasses.field(
        default_factory=lambda: defaultdict(set))
    blocked: dict[Channel, str] = dataclasses.field(default_factory=dict)
    outputs: set[Channel] = dataclasses.field(default_factory=set)
    leaf_uses: dict[int, int] = dataclasses.field(default_factory=lambda: defaultdict(int))

    def block(self, tags: Iterable[Tag | None], reason: str) -> None:
        for t in tags:
            if t is not None:
                self.blocked.setdefault(t.channel, reason)

    def why_not(self, channel: Channel) -> str | None:
        """Why ``channel``'s dead entries cannot be removed, or None when they can."""
        leaf, _ = channel
        if self.leaf_uses[leaf] != 1:
            return f"the kernel is read by {self.leaf_uses[leaf]} ops"
        if channel in self.blocked:
            return self.blocked[channel]
        edges = self.edges.get(channel, [])
        if not edges:
            return "no kernel reads its output"
        for e in edges:
            if self.leaf_uses[e.consumer] != 1:
                return "the next kernel is also read by other ops (e.g. a tied embedding)"
            if not e.zero:
                return ("a pruned channel is not zero where the next kernel reads it "
                        "(an activation or constant maps 0 elsewhere)")
        owners = [c for c, pairs in self.attached.items()
                  if any(p in pairs for p in self.attached.get(channel, ()))]
        if len(set(owners)) > 1 or any(self.leaf_uses[p[0]] != 1
                                       for p in self.attached.get(channel, ())):
            return "a leaf on its channels is shared with another layer or op"
        return None


def _zero(name: str, eqn, zeros: Sequence[bool]) -> bool:
    if name in _ZERO_UNARY:
        if name == "integer_pow" and eqn.params.get("y", 1) <= 0:
            return False
        return zeros[0]
    if name == "mul":
        return any(zeros)
    if name == "div":
        return zeros[0]
    if name in ("add", "sub", "max", "min", "add_any"):
        return all(zeros)
    if name == "select_n":
        return all(zeros[1:])
    return False


class _Walker(Walker):
    """The channel rules of the shared `jaxpr_walk.Walker`; findings go to ``flow``."""

    def __init__(self, flow: ChannelFlow):
        super().__init__(flow.leaf_uses)
        self.flow = flow

    def block(self, tags: Iterable[Tag | None], reason: str) -> None:
        self.flow.block(tags, reason)

    def lost(self, rank: int, reason: str) -> _Act:
        del reason  # the flow records reasons per channel, in `block`
        return _Act((None,) * rank)

    # -- ops ----------------------------------------------------------------------
    def _dot(self, eqn, ins):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        x, w = ins
        dims = [(lc, lb), (rc, rb)]
        acts = [isinstance(a, _Act) for a in ins]
        out_rank = len(eqn.outvars[0].aval.shape)
        if not any(acts):
            return [Static.blank(out_rank)]
        kernel_side = None
        if acts.count(True) == 1:
            k = acts.index(False)
            if leaf_view(ins[k]) is not None:
                kernel_side = k
        if kernel_side is None:
            for a in ins:
                if isinstance(a, _Act):
                    self.flow.block(a.tags, "a contraction of two activations (attention) "
                                    "or with a computed weight reads it")
            return [_Act((None,) * out_rank)]
        k, a = kernel_side, 1 - kernel_side
        kv, act = leaf_view(ins[k]), ins[a]
        leaf = ins[k].pure
        self.flow.uses[leaf] += 1
        kcon, kbat = dims[k]
        acon, abat = dims[a]
        for ad, kd in zip(acon, kcon):
            t = act.tags[ad]
            if t is None:
                continue
            if kv[kd] is None:
                self.flow.block([t], "a contraction over an axis its kernel broadcasts")
                continue
            self.flow.edges[t.channel].append(
                Edge(t.producer, t.axis, leaf, kv[kd], t.outer, t.inner, t.zero))
        self.flow.block([act.tags[d] for d in abat], "a batched contraction reads it")
        kfree = [d for d in range(len(kv)) if d not in kcon and d not in kbat]
        afree = [d for d in range(len(act.tags)) if d not in acon and d not in abat]
        out_axes = tuple(kv[d] for d in kfree if kv[d] is not None)
        self.flow.kernels.setdefault(leaf, out_axes)
        ktags = [None if kv[d] is None else Tag(leaf, kv[d]) for d in kfree]
        atags = [act.tags[d] for d in afree]
        batch = [None] * len(abat)
        tags = batch + (atags + ktags if a == 0 else ktags + atags)
        return [_Act(tuple(tags))]

    def _conv(self, eqn, ins):
        lhs, rhs = ins
        out_rank = len(eqn.outvars[0].aval.shape)
        p = eqn.params
        dn = p["dimension_numbers"]
        kv = leaf_view(rhs)
        if not isinstance(lhs, _Act) or kv is None:
            if isinstance(lhs, _Act):
                self.flow.block(lhs.tags, "a convolution with a computed kernel reads it")
            if isinstance(rhs, _Act):
                self.flow.block(rhs.tags, "a convolution reads it as its kernel")
            return [_Act((None,) * out_rank) if isinstance(lhs, _Act) or isinstance(rhs, _Act)
                    else Static.blank(out_rank)]
        leaf = rhs.pure
        self.flow.uses[leaf] += 1
        grouped = p["feature_group_count"] != 1 or p["batch_group_count"] != 1
        for d, t in enumerate(lhs.tags):
            if t is None:
                continue
            if d != dn.lhs_spec[1] or grouped or kv[dn.rhs_spec[1]] is None:
                self.flow.block([t], "a grouped convolution or a spatial axis reads it")
                continue
            self.flow.edges[t.channel].append(Edge(
                t.producer, t.axis, leaf, kv[dn.rhs_spec[1]], t.outer, t.inner, t.zero))
        tags: list[Tag | None] = [None] * out_rank
        out_axis = kv[dn.rhs_spec[0]]
        if out_axis is not None and not grouped:
            tags[dn.out_spec[1]] = Tag(leaf, out_axis)
            self.flow.kernels.setdefault(leaf, (out_axis,))
        return [_Act(tuple(tags))]

    def _elementwise(self, eqn, ins):
        name = eqn.primitive.name
        shape = eqn.outvars[0].aval.shape
        full = [a for a in ins if len(a.tags if isinstance(a, _Act) else a.leaves) == len(shape)]
        acts = [a for a in full if isinstance(a, _Act)]
        if name in ("convert_element_type", "copy", "copy_p", "reduce_precision") and \
                isinstance(ins[0], Static):
            return [ins[0]]
        zeros_of = [a.zero if isinstance(a, Static) else None for a in ins]
        if not any(isinstance(a, _Act) for a in ins):
            leaves = tuple(frozenset().union(*(a.leaves[d] for a in full))
                           for d in range(len(shape)))
            return [Static(leaves, _zero(name, eqn, zeros_of))]
        tags: list[Tag | None] = []
        for d in range(len(shape)):
            found = {a.tags[d].key(): a.tags[d] for a in acts if a.tags[d] is not None}
            if len(found) > 1:
                self.flow.block(found.values(), f"{name} mixes it with another layer's "
                                "channels (a residual or gating)")
                tags.append(None)
                continue
            if not found:
                tags.append(None)
                continue
            t = next(iter(found.values()))
            if any(a.tags[d] is None and v.aval.shape[d] != 1 for a, v in zip(ins, eqn.invars)
                   if isinstance(a, _Act) and len(a.tags) == len(shape)):
                self.flow.block([t], f"{name} mixes it with an activation that is not on its "
                                "channels (a residual)")
                tags.append(None)
                continue
            zeros = []
            for a, var in zip(ins, eqn.invars):
                if isinstance(a, _Act):
                    at = a.tags[d] if len(a.tags) == len(shape) else None
                    zeros.append(at is not None and at.zero)
                    continue
                zeros.append(a.zero)
                if len(a.leaves) != len(shape):
                    continue
                if a.leaves[d]:
                    if t.outer != 1 or t.inner != 1:
                        self.flow.block([t], f"{name} with a leaf after a flatten")
                    self.flow.attached[t.channel].update(a.leaves[d])
                elif var.aval.shape[d] != 1:
                    self.flow.block([t], f"{name} with a constant that differs per channel")
            tags.append(dataclasses.replace(t, zero=_zero(name, eqn, zeros)))
        return [_Act(tuple(tags))]

    def _structural(self, eqn, ins):
        """Transposes, reshapes, broadcasts, reductions and windows; None if not one."""
        name, p = eqn.primitive.name, eqn.params
        x = ins[0]
        is_act, axes, empty = per_axis(x)
        out_shape = eqn.outvars[0].aval.shape

        def make(new_axes, pure=True, zero=None):
            if is_act:
                return [_Act(tuple(new_axes))]
            return [Static(tuple(new_axes), x.zero if zero is None else zero,
                           x.pure if pure else None)]

        moved = moved_axes(eqn, axes, empty)
        if moved is not None:
            return make(moved)
        if name == "squeeze":
            drop = set(d % len(axes) for d in p["dimensions"])
            if is_act:
                self.flow.block([axes[d] for d in drop], "a squeeze drops it")
            return make([a for d, a in enumerate(axes) if d not in drop])
        if name == "reshape":
            old = eqn.invars[0].aval.shape
            groups = reshape_groups(old, out_shape)
            out = [empty] * len(out_shape)
            if groups is None:
                if is_act:
                    self.flow.block(axes, "a reshape reads it")
                return make(out, pure=False)
            pure = True
            for go, gn in groups:
                if len(gn) == 1:
                    if is_act:
                        tagged = [k for k, d in enumerate(go) if axes[d] is not None]
                        if len(tagged) > 1:
                            self.flow.block([axes[d] for d in go],
                                            "a reshape merges it with another channel axis")
                        elif tagged:
                            k = tagged[0]
                            t = axes[go[k]]
                            before = math.prod(old[e] for e in go[:k])
                            after = math.prod(old[e] for e in go[k + 1:])
                            out[gn[0]] = dataclasses.replace(
                                t, outer=t.outer * before, inner=t.inner * after)
                    else:
                        out[gn[0]] = frozenset().union(*(axes[d] for d in go))
                elif is_act:
                    self.flow.block([axes[d] for d in go], "a reshape splits it")
                else:
                    pure = False
            if is_act:
                self.flow.block([axes[d] for d, s in enumerate(old) if s == 1],
                                "a reshape drops it")
            return make(out, pure=pure)
        if name in REDUCE or name == "argmax" or name == "argmin":
            red = set(p["axes"])
            if is_act:
                self.flow.block([axes[d] for d in red], f"{name} reduces over it")
                if name not in REDUCE:
                    self.flow.block(axes, f"{name} reads it")
                    return make([None] * len(out_shape))
            return make([a for d, a in enumerate(axes) if d not in red], pure=False)
        if name in _WINDOW or name == "pad" or name == "slice":
            if not is_act:
                return make([empty] * len(out_shape), pure=False, zero=False)
            keep = []
            for d, t in enumerate(axes):
                if t is None:
                    keep.append(None)
                    continue
                ok = False
                if name == "pad":
                    ok = tuple(p["padding_config"][d]) == (0, 0, 0)
                elif name == "slice":
                    ok = (p["start_indices"][d] == 0 and p["limit_indices"][d] == out_shape[d]
                          and (p["strides"] is None or p["strides"][d] == 1))
                elif name.startswith("reduce_window"):
                    ok = (p["window_dimensions"][d] == 1 and p["window_strides"][d] == 1
                          and tuple(p["padding"][d]) == (0, 0))
                if not ok:
                    self.flow.block([t], f"{name} reads across it")
                    keep.append(None)
                    continue
                zero = t.zero
                if name == "pad":
                    pv = ins[1]
                    zero = zero and isinstance(pv, Static) and pv.zero
                elif name == "reduce_window_min" or name == "reduce_window_max":
                    zero = zero and tuple(p["padding"][d]) == (0, 0) and all(
                        tuple(q) == (0, 0) for q in p["padding"])
                keep.append(dataclasses.replace(t, zero=zero))
            return make(keep)
        return None

    def step(self, eqn, vals):
        name = eqn.primitive.name
        if not any(isinstance(a, _Act) for a in vals) and name not in _ELEMENTWISE \
                and name not in ("transpose", "broadcast_in_dim", "reshape", "squeeze",
                                 "expand_dims", "dot_general", "conv_general_dilated"):
            return None  # a value of leaves and constants no rule follows
        if name == "dot_general":
            return self._dot(eqn, vals)
        if name == "conv_general_dilated":
            return self._conv(eqn, vals)
        if name in _ELEMENTWISE:
            return self._elementwise(eqn, vals)
        if len(eqn.outvars) == 1:
            return self._structural(eqn, vals)
        return None


def channel_flow(program: flax_hooks.Program, *, zeroable: Iterable[int] = ()) -> ChannelFlow:
    """Follows every kernel's output channels through ``program`` (see module docstring).

    Args:
      program: from `flax_hooks.trace`.
      zeroable: indices of the leaves a dead channel's entries are zeroed in (a mask's
        leaves): a bias or a BatchNorm scale among them keeps a dead channel at zero.

    Returns:
      A `ChannelFlow`.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxopt_lab.core import channels, flax_hooks
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((1, 3))
      >>> program = flax_hooks.trace(model, model.init(jax.random.PRNGKey(0), x), x)
      >>> flow = channels.channel_flow(program, zeroable=range(program.n_vars))
      >>> [jax.tree_util.keystr(program.paths[k]) for k, _ in flow.edges]
      ["['params']['layers_0']['kernel']"]
    """
    flow = ChannelFlow()
    outs = _Walker(flow).walk(program, zeroable=zeroable)
    for o in outs:
        if isinstance(o, _Act):
            flow.block(o.tags, OUTPUT)
            flow.outputs.update(t.channel for t in o.tags if t is not None)
    return flow
