"""How jaxopt_lab sees a Flax model: the one hook layer, for linen and NNX alike.

A model call is traced once into a jaxpr whose first inputs are the leaves of the model's
variables (`trace`). `run` then evaluates that jaxpr with an interpreter that follows
every variable leaf through the *views* the model takes of it (dtype casts, transposes,
reshapes, broadcasts, nested ``jit`` and ``custom_jvp`` calls) and hands each op that
*consumes* a leaf -- a ``dot_general``, a convolution, a gather, an add, a multiply -- to
a hook, which may record it (the model map, calibration) or compute it differently (int8
execution). The model's code is never edited and nothing is guessed from an array's
shape: which axes a contraction reduces is read from the op itself.

Why a jaxpr interpreter and not method interception: it sees the op, not the layer, so one
mechanism serves ``nn.Dense``, ``DenseGeneral``, ``Einsum``, attention, ``Embed.attend``,
hand-written ``jnp.einsum`` and NNX modules, with boxed (partitioned) parameters unboxed
by Flax itself during the trace.

Two rewrites act on a whole layer rather than on the ops that consume a weight: skipping a
folded BatchNorm (its identity is a chain of ops over four variables) and computing a
layer's convolution another way inside the sweep's ``vmap``/``grad``. Both go through
`intercept_linen`, the one place jaxopt_lab uses linen's method interception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from jaxopt_lab.quant.qtensor import is_qtensor

KeyPath = tuple[Any, ...]

# Ops that only look at a leaf differently: the consumer behind them still reads the leaf.
_CASTS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
# Calls whose body runs exactly once per call: the interpreter walks into them.
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                     "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint", "remat"})


@dataclasses.dataclass(frozen=True)
class View:
    """How a value inside the trace looks at a variable leaf.

    Attributes:
      leaf: index of the variable leaf in `Program.paths`.
      axes: for every axis of the value, the leaf axes it spans (``()`` for an axis a
        broadcast added; several for a reshape that merged leaf axes).
      perm_only: True when the value is the leaf up to a dtype cast and a transpose, so an
        op on the value is the same op on the leaf with its axes renumbered.
    """

    leaf: int
    axes: tuple[tuple[int, ...], ...]
    perm_only: bool

    def leaf_axes(self, dims: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted(a for d in dims for a in self.axes[d]))


@dataclasses.dataclass(frozen=True)
class Use:
    """One op consuming a variable leaf (through a `View`).

    Attributes:
      op: ``"dot_general"``, ``"conv"``, ``"gather"``, ``"add"``, ``"mul"`` or the primitive's
        name for anything else.
      operand: which operand of the op the leaf is.
      contracting / outputs / batch: leaf axes the op reduces, keeps as output features, and
        maps one to one (batch dims of a ``dot_general``); for a gather, the indexed axes are
        ``outputs`` (rows) and the gathered features ``contracting`` (what ``attend``
        contracts when the table is tied).
      complete: every leaf axis was seen intact by the op (no split reshape in between).
    """

    op: str
    operand: int
    contracting: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    complete: bool = True


@dataclasses.dataclass(frozen=True)
class Program:
    """A model call traced into a jaxpr: variable leaves first, then the call's arrays."""

    closed: Any  # jax ClosedJaxpr
    paths: tuple[KeyPath, ...]
    var_treedef: Any
    arg_treedef: Any
    out_treedef: Any
    n_vars: int
    api: str  # "linen" or "nnx"
    leaves: tuple  # the traced variables' leaves (QTensors whole; NNX: over the module's state)


def path_names(path: Any) -> tuple[str, ...]:
    """A key path as plain names, without the ``.value`` of Flax boxes and NNX variables."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                names.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return tuple(names)


def _is_leaf(x: Any) -> bool:
    return is_qtensor(x)


def _stand_in(x: Any) -> Any:
    if is_qtensor(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return jax.ShapeDtypeStruct(np.shape(x), dtype)


def is_nnx(model: Any) -> bool:
    """True for an NNX module or graph definition."""
    from flax import nnx
    return isinstance(model, (nnx.Module, nnx.GraphDef))


def nnx_variables(model: Any, variables: Any) -> tuple[Any, Any]:
    """(graphdef, full state) of an NNX model with ``variables`` laid over its own state.

    ``variables`` may be ``None`` (the module's state), a full state, or any sub-state
    (e.g. ``nnx.state(module, nnx.Param)`` after `quantize`); leaves are matched by path.
    """
    from flax import nnx
    if isinstance(model, nnx.GraphDef):
        if variables is None:
            raise ValueError("an NNX GraphDef needs its state as `variables`")
        return model, variables
    graphdef, state = nnx.split(model)
    if variables is None:
        return graphdef, state
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_leaf)
    given = {jax.tree_util.keystr(p): x
             for p, x in jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_leaf)[0]}
    known = {jax.tree_util.keystr(p) for p, _ in flat}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"variables has leaves the NNX module does not: {unknown[:5]}")
    leaves = [given.get(jax.tree_util.keystr(p), x) for p, x in flat]
    return graphdef, jax.tree_util.tree_unflatten(treedef, leaves)


def model_call(model: Any, variables: Any, kwargs: dict[str, Any]) -> tuple[Callable, Any]:
    """``(fn(variables, *args), variables)`` calling a linen or NNX model.

    Raises:
      ValueError: when ``model`` is neither a linen nor an NNX module.
    """
    import flax.linen as nn
    if isinstance(model, nn.Module):
        return (lambda v, *a: model.apply(v, *a, **kwargs)), variables
    if is_nnx(model):
        from flax import nnx
        graphdef, state = nnx_variables(model, variables)
        method = kwargs.pop("method", None) if "method" in kwargs else None

        def call(v, *a):
            module = nnx.merge(graphdef, v)
            fn = module if method is None else (
                getattr(module, method) if isinstance(method, str) else
                (lambda *b, **k: method(module, *b, **k)))
            return fn(*a, **kwargs)
        return call, state
    raise ValueError(f"expected a flax.linen Module or an NNX Module/GraphDef, got "
                     f"{type(model).__name__}")


def trace(model: Any, variables: Any, *args: Any, **kwargs: Any) -> Program:
    """Traces ``model(variables, *args, **kwargs)`` abstractly (no compute) into a `Program`.

    Args:
      model: a linen module (called as ``model.apply(variables, *args, **kwargs)``) or an NNX
        module / graphdef (called as ``nnx.merge(graphdef, state)(*args, **kwargs)``).
      variables: linen variables, or an NNX state (``None`` for the module's own); leaves may
        be `QTensor` s (traced as float arrays of their original shape and dtype).
      *args, **kwargs: the call's arguments; arrays in ``args`` become inputs, ``kwargs``
        are static (``train=False``, ``method``, ``mutable``...).
    """
    fn, variables = model_call(model, variables, dict(kwargs))
    flat, var_treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_leaf)
    paths = tuple(p for p, _ in flat)
    arg_leaves, arg_treedef = jax.tree.flatten(args)
    out_box = []

    def flat_fn(var_leaves, arg_leaves):
        out = fn(jax.tree.unflatten(var_treedef, var_leaves),
                 *jax.tree.unflatten(arg_treedef, arg_leaves))
        leaves, treedef = jax.tree.flatten(out)
        out_box.append(treedef)
        return leaves

    closed = jax.make_jaxpr(flat_fn)([_stand_in(x) for _, x in flat],
                                     [_stand_in(x) for x in arg_leaves])
    api = "nnx" if is_nnx(model) else "linen"
    return Program(closed, paths, var_treedef, arg_treedef, out_box[-1], len(paths), api,
                   tuple(x for _, x in flat))


# A layer handler: (module, method_name, call, args, kwargs) -> output; ``call(*args,
# **kwargs)`` runs the layer's own method.
LayerHandler = Callable[..., Any]


@contextlib.contextmanager
def intercept_linen(handler: LayerHandler) -> Iterator[None]:
    """Within this context every linen method call goes through ``handler``.

    ``handler(module, method_name, call, args, kwargs)`` returns the call's output; it
    calls ``call(*args, **kwargs)`` to run the layer as written. Linen only: an NNX module
    is plain Python, rewritten by replacing its submodules (see ``bn_fold_nnx``).
    """
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        return handler(context.module, context.method_name, next_fun, args, kwargs)

    with nn.intercept_methods(interceptor):
        yield


# --- the interpreter ------------------------------------------------------------------

# A hook: (use, leaf, eqn, in_values, views, read_leaf) -> output values, or None to
# evaluate the op as traced (on the float value of the leaf).
Hook = Callable[..., Any]


def _reshape_axes(view: View, old: Sequence[int], new: Sequence[int]) -> View | None:
    """The view after a reshape that merges (or keeps) runs of axes; None for a split."""
    out, i = [], 0
    for size in new:
        span, prod = [], 1
        while i < len(old) and (prod < size or (size == 1 and old[i] == 1 and not span)):
            span.append(i)
            prod *= old[i]
            i += 1
            if prod == size and size != 1:
                break
        if prod != size:
            return None
        out.append(tuple(a for d in span for a in view.axes[d]))
    while i < len(old) and old[i] == 1:  # trailing size-1 axes dropped
        if view.axes[i]:
            out[-1] = out[-1] + view.axes[i]
        i += 1
    if i != len(old):
        return None
    merged = any(len(a) > 1 for a in out)
    return View(view.leaf, tuple(out), view.perm_only and not merged)


def _propagate(eqn, views: list[View | None]) -> View | None:
    """The output view of a view-taking op with a viewed operand, or None if not a view."""
    name, v = eqn.primitive.name, views[0]
    if v is None or any(w is not None for w in views[1:]):
        return None
    if name in _CASTS:
        return v
    if name == "transpose":
        return View(v.leaf, tuple(v.axes[d] for d in eqn.params["permutation"]), v.perm_only)
    if name == "reshape":
        return _reshape_axes(v, eqn.invars[0].aval.shape, eqn.params["new_sizes"])
    if name == "squeeze":
        drop = set(eqn.params["dimensions"])
        return View(v.leaf, tuple(a for d, a in enumerate(v.axes) if d not in drop), False)
    if name == "expand_dims":
        return None
    if name == "broadcast_in_dim":
        out = [()] * len(eqn.params["shape"])
        for d, o in enumerate(eqn.params["broadcast_dimensions"]):
            out[o] = v.axes[d]
        return View(v.leaf, tuple(out), False)
    return None


def classify(eqn, views: list[View | None], ndims: Sequence[int]) -> list[Use]:
    """The uses an op makes of its viewed operands."""
    name, out = eqn.primitive.name, []
    for i, v in enumerate(views):
        if v is None:
            continue
        rank = ndims[v.leaf]
        seen = sorted(a for axes in v.axes for a in axes)
        complete = seen == list(range(rank))
        if name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            con, bat = v.leaf_axes(lc if i == 0 else rc), v.leaf_axes(lb if i == 0 else rb)
            rest = tuple(a for a in range(rank) if a not in con and a not in bat)
            out.append(Use("dot_general", i, con, rest, bat, complete))
        elif name == "conv_general_dilated" and i == 1:
            spec = eqn.params["dimension_numbers"].rhs_spec
            con = v.leaf_axes([spec[1], *spec[2:]])
            out.append(Use("conv", i, con, v.leaf_axes([spec[0]]), (), complete))
        elif name == "gather" and i == 0:
            rows = v.leaf_axes(eqn.params["dimension_numbers"].start_index_map)
            feats = tuple(a for a in range(rank) if a not in rows)
            out.append(Use("gather", i, feats, rows, (), complete))
        elif name in ("add", "sub"):
            out.append(Use("add", i, complete=complete))
        elif name in ("mul", "div"):
            out.append(Use("mul", i, complete=complete))
        else:
            out.append(Use(name, i, complete=complete))
    return out


def sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]] | None:
    """``(jaxpr, consts)`` of a call whose body runs once per call (nested ``jit``,
    ``custom_jvp``...), which walkers of the trace step into; None for any other op."""
    if eqn.primitive.name not in _INLINE:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if isinstance(sub, jcore.ClosedJaxpr):
            jaxpr, consts = sub.jaxpr, sub.consts
        elif isinstance(sub, jcore.Jaxpr):
            jaxpr, consts = sub, ()
        else:
            return None
        if len(jaxpr.invars) == len(eqn.invars):
            return jaxpr, consts
    return None


_sub_jaxpr = sub_jaxpr


def _bind(eqn, invals: list[Any]) -> list[Any]:
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


class _Deferred:
    """A value not computed yet: a variable leaf, or a view of one, that an op may never
    need as a float array (an intercepted op reads the leaf itself)."""

    __slots__ = ("thunk",)

    def __init__(self, thunk: Callable[[], Any]):
        self.thunk = thunk


class _Interpreter:
    def __init__(self, leaves: Sequence[Any], hook: Hook | None):
        self.leaves, self.hook = leaves, hook
        self.ndims = [len(getattr(x, "shape", np.shape(x))) for x in leaves]

    def eval(self, jaxpr, consts, args: Sequence[Any], views: Sequence[View | None]):
        env: dict[Any, Any] = {}
        vw: dict[Any, View] = {}

        def raw(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        def read(v):
            val = raw(v)
            if isinstance(val, _Deferred):
                val = env[v] = val.thunk()
            return val

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a, w in zip(jaxpr.invars, args, views):
            env[v] = a
            if w is not None:
                vw[v] = w
        for eqn in jaxpr.eqns:
            in_views = [None if isinstance(v, jcore.Literal) else vw.get(v)
                        for v in eqn.invars]
            outs = None
            if any(w is not None for w in in_views):
                sub = _sub_jaxpr(eqn)
                out_view = None if sub else _propagate(eqn, in_views)
                if sub is not None:
                    outs = self.eval(sub[0], sub[1], [raw(v) for v in eqn.invars], in_views)
                elif out_view is not None:
                    vw[eqn.outvars[0]] = out_view
                    outs = [_Deferred(lambda e=eqn: _bind(e, [read(v) for v in e.invars])[0])]
                elif self.hook is not None:
                    outs = self.hook(eqn, classify(eqn, in_views, self.ndims), in_views, read,
                                     self.leaves)
            if outs is None:
                outs = _bind(eqn, [read(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]


def run(program: Program, leaves: Sequence[Any], arg_leaves: Sequence[Any], *,
        hook: Hook | None = None, float_leaf: Callable = lambda x: x) -> Any:
    """Evaluates ``program`` on variable ``leaves`` and the call's ``arg_leaves``.

    Args:
      program: from `trace`.
      leaves: one value per ``program.paths`` entry (arrays, `QTensor` s...).
      arg_leaves: the call's array leaves.
      hook: ``hook(eqn, uses, views, read, leaves) -> outputs | None`` for every op that
        consumes a variable leaf (not for views): return the op's outputs (a list) to replace
        it, or None to evaluate it as traced.
      float_leaf: turns a leaf into the float array the traced ops expect (e.g. dequantize);
        called at most once per leaf, only for leaves an op actually needs as floats.

    Returns:
      The call's output pytree.
    """
    if len(leaves) != program.n_vars:
        raise ValueError(f"expected {program.n_vars} variable leaves, got {len(leaves)}")
    interp = _Interpreter(leaves, hook)
    jaxpr = program.closed.jaxpr
    views = [View(i, tuple((a,) for a in range(interp.ndims[i])), True)
             for i in range(program.n_vars)] + [None] * len(arg_leaves)
    args = [_Deferred(lambda x=x: float_leaf(x)) for x in leaves] + list(arg_leaves)
    outs = interp.eval(jaxpr, program.closed.consts, args, views)
    return jax.tree.unflatten(program.out_treedef, outs)


def operand_permutation(view: View) -> tuple[int, ...] | None:
    """For a `View` that is the leaf up to a transpose: operand dim -> leaf axis."""
    if not view.perm_only or any(len(a) != 1 for a in view.axes):
        return None
    return tuple(a[0] for a in view.axes)


def size_of(shape: Sequence[int], axes: Sequence[int]) -> int:
    return math.prod(shape[a] for a in axes)


# --- the trace as one flat list of ops ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FlatEqn:
    """One op of a `Program` with nested calls inlined: ``ins``/``outs`` are value ids
    (ints; the program's inputs are ``0 .. n-1``) or ``jax`` literals."""

    eqn: Any
    ins: tuple
    outs: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.eqn.primitive.name


def flat_eqns(program: Program) -> tuple[list[FlatEqn], list]:
    """The program's ops in order with nested ``jit``/``custom_jvp`` bodies inlined, and
    the ids of its outputs: a graph whose value ids are global, for pattern matching."""
    jaxpr = program.closed.jaxpr
    counter = iter(range(len(jaxpr.invars), 1 << 62))
    out: list[FlatEqn] = []

    def walk(jaxpr, env) -> None:
        def get(v):
            return v if isinstance(v, jcore.Literal) else env[v]

        for v in jaxpr.constvars:
            env.setdefault(v, next(counter))
        for eqn in jaxpr.eqns:
            ins = tuple(get(v) for v in eqn.invars)
            sub = sub_jaxpr(eqn)
            if sub is not None:
                inner = dict(zip(sub[0].invars, ins))
                walk(sub[0], inner)
                for v, w in zip(eqn.outvars, sub[0].outvars):
                    env[v] = w if isinstance(w, jcore.Literal) else inner[w]
                continue
            outs = tuple(next(counter) for _ in eqn.outvars)
            env.update(zip(eqn.outvars, outs))
            out.append(FlatEqn(eqn, ins, outs))

    env = {v: i for i, v in enumerate(jaxpr.invars)}
    walk(jaxpr, env)
    return out, [v if isinstance(v, jcore.Literal) else env[v] for v in jaxpr.outvars]
