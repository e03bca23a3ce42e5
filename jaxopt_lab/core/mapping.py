"""The model map: what every parameter leaf of a model is, read once from the model.

`model_map` traces the model abstractly (no real compute) through the hook layer
(`jaxopt_lab.core.flax_hooks`) and records, for every variable leaf, each op that consumes
it. From those uses it derives the leaf's role and axes:

* ``"kernel"``: the weight of a ``dot_general`` (Dense, DenseGeneral, attention, Einsum,
  ``jnp.einsum``) or a convolution. ``contracting`` are the axes the op reduces (all of
  ``kh, kw, in`` for a conv), ``outputs`` the output features (``heads, head_dim`` for an
  attention query kernel), ``batch`` the axes a ``dot_general`` maps one to one.
* ``"embedding"``: a table read by a gather; ``outputs`` are its rows and ``contracting``
  its features (exactly the axes a tied ``Embed.attend`` output head contracts).
* ``"bias"`` (only added), ``"norm"`` (multiplied: norm scales), ``"other"`` (any other
  consumer, or uses that disagree), ``"unused"``.
* ``"batch_stats"``: a BatchNorm running mean or variance, read from what Flax keeps it as
  (linen's ``batch_stats`` collection, an NNX ``nnx.BatchStat``), not from its uses (the
  mean is added like a bias). No technique selects it by default; `bn_fold` folds it.

Every technique takes the map through one keyword, ``model_map=``, and reads it with
`ModelMap.lookup`, which accepts the leaf paths of the whole variables tree or of any
subtree (``variables["params"]``, ``nnx.state(module, nnx.Param)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxopt_lab.core import flax_hooks, foldflow

ROLES = ("kernel", "embedding", "bias", "norm", "batch_stats", "other", "unused")
Names = tuple[str, ...]


path_names = flax_hooks.path_names


def layer_of(names: Names, api: str) -> str:
    """The layer key of a leaf: its module path joined by ``/`` (linen: without the
    variable collection, e.g. ``"Block_0/Dense_1"``)."""
    return "/".join(names[1:-1] if api == "linen" else names[:-1])


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """What the model does with one variable leaf (see the module docstring).

    Attributes:
      path: the leaf's names from the root of the traced variables.
      shape, dtype: the leaf's shape and dtype name.
      role: one of `ROLES`.
      contracting, outputs, batch: the leaf axes of its kernel/embedding use (empty for
        other roles).
      layer: the layer key (module path joined by ``/``, e.g. ``"Block_0/Dense_1"``).
      uses: every op that consumes the leaf.
    """

    path: Names
    shape: tuple[int, ...]
    dtype: str
    role: str
    contracting: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    layer: str = ""
    uses: tuple[flax_hooks.Use, ...] = ()

    @property
    def channel_axes(self) -> tuple[int, ...]:
        """Axes with one scale each: the outputs and the batch axes."""
        return tuple(sorted(self.outputs + self.batch))


def _batch_stats(program: flax_hooks.Program) -> set[Names]:
    """The leaves Flax keeps as BatchNorm running statistics: linen's ``batch_stats``
    collection, NNX ``nnx.BatchStat`` variables."""
    if program.api == "linen":
        return {n for n in map(path_names, program.paths) if n[:1] == ("batch_stats",)}
    from flax import nnx

    state = jax.tree.unflatten(program.var_treedef, program.leaves)
    flat, _ = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {path_names(p) for p, v in flat if isinstance(v, nnx.BatchStat)}


def _role(uses: list[flax_hooks.Use]) -> tuple[str, tuple, tuple, tuple]:
    if not uses:
        return "unused", (), (), ()
    gathers = [u for u in uses if u.op == "gather"]
    weights = [u for u in uses if u.op in ("dot_general", "conv")]
    axes = {(u.contracting, u.outputs, u.batch) for u in gathers + weights}
    consistent = len(axes) == 1 and all(u.complete for u in gathers + weights)
    if gathers or weights:
        others = [u for u in uses if u.op not in ("gather", "dot_general", "conv")]
        if consistent and not others:
            return ("embedding" if gathers else "kernel"), *next(iter(axes))
        return "other", (), (), ()
    ops = {u.op for u in uses}
    if ops == {"add"}:
        return "bias", (), (), ()
    if ops <= {"add", "mul"}:
        return "norm", (), (), ()
    return "other", (), (), ()


@dataclasses.dataclass(frozen=True)
class ModelMap(Mapping):
    """``{leaf names: LeafInfo}`` for every variable leaf of a traced model.

    Build it with `model_map`. It is a read-only mapping keyed by the leaf's names from
    the root of the traced variables; `lookup` also finds a leaf by the path it has in a
    subtree.
    """

    infos: Mapping[Names, LeafInfo]
    api: str = "linen"
    folds: Mapping[Names, foldflow.FoldTarget | str] = dataclasses.field(
        default_factory=dict)

    def __getitem__(self, key: Names) -> LeafInfo:
        return self.infos[key]

    def __iter__(self) -> Iterator[Names]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __hash__(self) -> int:
        return id(self)

    @property
    def _suffixes(self) -> dict[Names, list[Names]]:
        cached = self.__dict__.get("_suffix_cache")
        if cached is None:
            cached = {}
            for key in self.infos:
                for k in range(len(key)):
                    cached.setdefault(key[k:], []).append(key)
            object.__setattr__(self, "_suffix_cache", cached)
        return cached

    def lookup(self, path: Any) -> LeafInfo | None:
        """The `LeafInfo` of a leaf given by key path (or names); None if not in the map.

        The path may be relative to a subtree of the traced variables (its names must then
        end exactly one traced leaf's names).
        """
        names = path if all(isinstance(n, str) for n in path) else path_names(path)
        names = tuple(names)
        if names in self.infos:
            return self.infos[names]
        found = self._suffixes.get(names, [])
        return self.infos[found[0]] if len(found) == 1 else None

    def fold_target(self, path: Any) -> foldflow.FoldTarget | None:
        """Where a per-input-channel scale of the kernel at ``path`` folds exactly.

        The input ``x`` of the kernel's contraction is divided by ``s`` (its rows multiplied
        by ``s``) with no extra op when ``x``'s producer absorbs ``1 / s``: a norm's scale and
        bias, or a previous kernel's output columns and bias. Returns None where nothing
        does (`fold_reason` says why); a target shared by several kernels (q, k, v after one
        norm) lists them all in ``kernels``: they must take the same ``s``. Apply it with
        `jaxopt_lab.core.foldflow.fold_scale`.
        """
        found = self._fold(path)
        return found if isinstance(found, foldflow.FoldTarget) else None

    def fold_reason(self, path: Any) -> str | None:
        """Why the kernel at ``path`` has no `fold_target` (None when it has one)."""
        found = self._fold(path)
        return None if isinstance(found, foldflow.FoldTarget) else found

    def _fold(self, path: Any) -> foldflow.FoldTarget | str:
        info = self.lookup(path)
        if info is None:
            return "the leaf is not in the model map"
        return self.folds.get(info.path, "no contraction reads it as a kernel")

    def kernels(self) -> dict[Names, LeafInfo]:
        """The leaves whose role is ``"kernel"``."""
        return {k: v for k, v in self.infos.items() if v.role == "kernel"}

    def where(self, *roles: str):
        """A ``where`` callable selecting the float leaves with one of ``roles``.

        Examples:
          ``jol.quantize(params, model_map=mm, where=mm.where("kernel", "embedding"))``
        """
        bad = sorted(set(roles) - set(ROLES))
        if bad:
            raise ValueError(f"unknown roles {bad}; roles are {ROLES}")

        def select(path, leaf) -> bool:
            info = self.lookup(path)
            return info is not None and info.role in roles
        return select

    def summary(self) -> str:
        """One line per leaf: path, shape, role and axes."""
        lines = []
        for k, v in self.infos.items():
            axes = (f" contracting={v.contracting} outputs={v.outputs}"
                    + (f" batch={v.batch}" if v.batch else "")) if v.contracting else ""
            lines.append(f"{'/'.join(k)} {v.shape}: {v.role}{axes}")
        return "\n".join(lines)


def model_map(model: Any, variables: Any = None, *args: Any, **kwargs: Any) -> ModelMap:
    """Traces a linen or NNX model once (abstractly) and maps every variable leaf.

    Args:
      model: a ``flax.linen.Module`` or an NNX module (or graphdef).
      variables: the linen variables (as ``init`` returns them, boxed partitioning metadata
        included), or for NNX ``None`` (the module's own state) or a state.
      *args: example inputs (arrays or ``jax.ShapeDtypeStruct`` s); only shapes matter.
      **kwargs: static keyword arguments of the call (``train=False``, ``method``...).

    Returns:
      A `ModelMap`.

    Raises:
      ValueError: when ``model`` is not a Flax module.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxopt_lab as jol
      >>> model = nn.DenseGeneral((4, 8))
      >>> x = jnp.ones((2, 16))
      >>> mm = jol.model_map(model, model.init(jax.random.PRNGKey(0), x), x)
      >>> info = mm.lookup(("params", "kernel"))
      >>> info.role, info.contracting, info.outputs
      ('kernel', (0,), (1, 2))
    """
    program = flax_hooks.trace(model, variables, *args, **kwargs)
    uses: dict[int, list[flax_hooks.Use]] = {i: [] for i in range(program.n_vars)}

    def record(eqn, found, views, read, leaves):
        del eqn, read, leaves
        for use, view in zip(found, [v for v in views if v is not None]):
            uses[view.leaf].append(use)
        return None

    def abstract(var_leaves, arg_leaves):
        return flax_hooks.run(program, var_leaves, arg_leaves, hook=record)

    avals = [v.aval for v in program.closed.jaxpr.invars]
    jax.eval_shape(abstract, avals[:program.n_vars], avals[program.n_vars:])
    api = program.api
    stats = _batch_stats(program)
    infos = {}
    for i, path in enumerate(program.paths):
        names = path_names(path)
        aval = avals[i]
        role, con, out, bat = ("batch_stats", (), (), ()) if names in stats else _role(uses[i])
        infos[names] = LeafInfo(names, tuple(aval.shape), np.dtype(aval.dtype).name, role,
                                con, out, bat, layer_of(names, api), tuple(uses[i]))
    folds = {path_names(program.paths[i]): t
             for i, t in foldflow.fold_targets(program).items()}
    return ModelMap(infos, api, folds)
