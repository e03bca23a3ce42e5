"""The one way every technique decides which leaves of a pytree it touches.

A `where` argument is one of:

* ``None`` -- the default: with a model map (``model_map=``, from
  `jaxopt_lab.model_map`) the leaves the map knows as kernels (the weights of a
  ``dot_general``, convolution or einsum; not embeddings, biases or norms); without one, the
  shape rule: floating-point leaves with ``ndim >= 2``;
* a pytree of bools with the tree's structure, or a prefix of it (a bool at an inner
  node applies to every leaf below it), as in ``optax.masked``;
* a callable ``(path, leaf) -> bool`` over ``jax.tree_util`` key paths.

A callable (or a mask tree) may also return per-leaf settings instead of ``True``: the
leaf is selected with its own settings (mixed precision, for example 8 bits for the first
layer). They are either

* a settings record of the technique's own type (preferred; e.g.
  ``jaxopt_lab.QuantSettings(bits=8)`` for `jaxopt_lab.quantize`): the leaf's complete
  settings, checked when the record is built; or
* a mapping of some of the record's fields (``{"bits": 8}``): the call's keyword
  arguments with those fields replaced.

`leaf_overrides` turns either into the leaf's record, for every technique.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
KeyPath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SettingsRecord:
    """Base of the frozen, keyword-only settings records (one type per technique).

    A subclass checks its fields in ``__post_init__`` and raises a ``ValueError`` naming
    the bad value; so a record that exists is valid, and ``dataclasses.replace`` (which
    builds a new record) checks again.
    """


S = TypeVar("S", bound=SettingsRecord)
Choice = bool | Mapping[str, Any] | SettingsRecord
Where = None | Params | Callable[[KeyPath, Any], Choice]


def is_overrides(choice: Any) -> bool:
    """True for a per-leaf settings choice: a mapping or a settings record."""
    return isinstance(choice, (Mapping, SettingsRecord))


def settings(where: str, cls: type[S], **kwargs: Any) -> S:
    """``cls(**kwargs)``, with an error message that starts with ``where``.

    Raises:
      ValueError: (or ``TypeError``, where a record raises one) ``"{where}: ..."``.
    """
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: {e}") from None


class InvalidSettings:
    """The error of call settings that failed their check, raised at the first leaf.

    The one-shot methods name the leaf in every error, also for a bad keyword
    argument; `leaf_overrides` raises this error, prefixed with the leaf's path.
    """

    def __init__(self, error: Exception):
        self.error = error


def deferred_settings(cls: type[S], **kwargs: Any) -> S | InvalidSettings:
    """``cls(**kwargs)``, or an `InvalidSettings` that `leaf_overrides` raises per leaf."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        return InvalidSettings(e)


def _field_names(record: SettingsRecord) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(record))


def fields_of(record: SettingsRecord) -> dict[str, Any]:
    """A record's fields as keyword arguments (a shallow ``dataclasses.asdict``)."""
    return {name: getattr(record, name) for name in _field_names(record)}


def _same(a: Any, b: Any) -> bool:
    """Equality that never raises (a traced value is never "the same")."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 -- tracers, arrays: not provably equal
        return False


def overridden(choice: Any, base: SettingsRecord, record: SettingsRecord) -> frozenset[str]:
    """The fields a leaf's choice sets explicitly.

    A mapping's keys; for a record, the fields whose values differ from the call's
    settings ``base`` (a record repeating the call's value sets nothing). ``record`` is
    the leaf's record from `leaf_overrides`.
    """
    if isinstance(choice, Mapping):
        return frozenset(choice)
    if isinstance(choice, SettingsRecord):
        return frozenset(f for f in _field_names(record)
                         if not _same(getattr(record, f), getattr(base, f)))
    return frozenset()


def path_str(path: KeyPath) -> str:
    """Human-readable leaf path, e.g. ``['params']['Dense_0']['kernel']``."""
    return jax.tree_util.keystr(path) or "<root>"


def leaf_overrides(path: KeyPath | str, choice: Any, base: S | InvalidSettings) -> S:
    """The settings record of one selected leaf: the one check of per-leaf overrides.

    Args:
      path: the leaf's key path (or its path string), named in every error.
      choice: the leaf's `where` choice: ``True`` (the call's settings), a mapping of
        some fields, or a record of ``base``'s type (the leaf's complete settings).
      base: the call's settings record (from its keyword arguments), or the
        `InvalidSettings` they gave.

    Returns:
      ``base`` for a plain selection, the record itself, or
      ``dataclasses.replace(base, **mapping)``.

    Raises:
      ValueError: naming the leaf, for a mapping key that is not a field of ``base``, a
        record of another technique's type, a value the record rejects, or call
        settings that were invalid.
    """
    where = path if isinstance(path, str) else path_str(path)
    if isinstance(base, InvalidSettings):
        raise type(base.error)(f"{where}: {base.error}") from None
    if isinstance(choice, SettingsRecord):
        if type(choice) is not type(base):
            raise ValueError(f"{where}: `where` gave a {type(choice).__name__} for a "
                             f"technique whose per-leaf settings are {type(base).__name__} "
                             "(or a mapping of its fields)")
        return choice
    if not isinstance(choice, Mapping):
        return base
    allowed = _field_names(base)
    unknown = sorted(set(choice) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown per-leaf setting(s) {unknown} in `where`; "
                         f"allowed: {list(allowed)}")
    try:
        return dataclasses.replace(base, **choice)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: {e}") from None


def is_float_array(leaf: Any) -> bool:
    """True for array-likes with a floating dtype (float16, bfloat16, float32, float64)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def default_where(path: KeyPath, leaf: Any) -> bool:
    """Floating-point leaves with ``ndim >= 2``: kernels and embeddings."""
    del path
    return is_float_array(leaf) and np.ndim(leaf) >= 2


class _Overrides:
    """Opaque (non-pytree) wrapper of a per-leaf settings mapping inside a mask tree."""

    def __init__(self, mapping: Mapping[str, Any]):
        self.mapping = mapping


def _wrap_overrides(mask: Any, tree: Any) -> Any:
    """Tells mask-tree dicts (same keys as the tree's dict there) from settings mappings."""
    if isinstance(mask, Mapping):
        if isinstance(tree, Mapping) and set(mask) == set(tree):
            return type(mask)({k: _wrap_overrides(mask[k], tree[k]) for k in mask})
        return _Overrides(mask)
    if type(mask) in (list, tuple) and type(mask) is type(tree) and len(mask) == len(tree):
        return type(mask)(_wrap_overrides(m, t) for m, t in zip(mask, tree))
    return mask


def _broadcast_mask(tree: Params, mask: Params, is_leaf) -> list[Choice]:
    """Expands a mask tree (or a prefix of the tree's structure) to one choice per leaf."""
    is_choice = lambda x: (  # noqa: E731
        isinstance(x, (bool, np.bool_, _Overrides, SettingsRecord)) or x is None)
    try:
        expanded = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub, is_leaf=is_leaf),
            _wrap_overrides(mask, tree),
            tree,
            is_leaf=is_choice,
        )
    except ValueError as e:
        raise ValueError(f"`where` mask tree does not match the params tree: {e}") from None
    choices = jax.tree.leaves(expanded, is_leaf=is_choice)
    choices = [c.mapping if isinstance(c, _Overrides) else c for c in choices]
    for c in choices:
        if not isinstance(c, (bool, np.bool_)) and not is_overrides(c) and c is not None:
            raise ValueError(f"`where` mask entries must be bools, got {c!r}")
    return [c if is_overrides(c) else bool(c) for c in choices]


def map_kernels(model_map: Any) -> Callable[[KeyPath, Any], bool]:
    """The default selection with a model map: float leaves the map knows as kernels."""
    def where(path: KeyPath, leaf: Any) -> bool:
        info = model_map.lookup(path)
        return is_float_array(leaf) and info is not None and info.role == "kernel"
    return where


def leaf_choices(
    tree: Params, where: Where = None, *, is_leaf=None, model_map: Any = None
) -> list[tuple[KeyPath, Any, Choice]]:
    """Returns ``(path, leaf, choice)`` for every leaf, in ``jax.tree.leaves`` order.

    ``choice`` is ``False`` (untouched), ``True`` (selected) or the leaf's own settings
    (selected): a mapping of overrides or a settings record, for `leaf_overrides`. ``model_map`` only changes the default selection.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    if where is None:
        rule = default_where if model_map is None else map_kernels(model_map)
        return [(p, x, rule(p, x)) for p, x in flat]
    if callable(where) and not isinstance(where, Mapping):
        out = []
        for p, x in flat:
            c = where(p, x)
            if not is_overrides(c):
                c = bool(c)
            out.append((p, x, c))
        return out
    choices = _broadcast_mask(tree, where, is_leaf)
    return [(p, x, c) for (p, x), c in zip(flat, choices)]


def selection(tree: Params, where: Where = None, *, is_leaf=None, model_map: Any = None
              ) -> Params:
    """Pytree of Python bools (same structure as ``tree``): which leaves are selected."""
    treedef = jax.tree.structure(tree, is_leaf=is_leaf)
    picks = [c is not False
             for _, _, c in leaf_choices(tree, where, is_leaf=is_leaf, model_map=model_map)]
    return jax.tree.unflatten(treedef, picks)


def map_selected(
    fn: Callable[[KeyPath, Any, Choice], Any], tree: Params, where: Where = None, *, is_leaf=None,
    model_map: Any = None,
) -> Params:
    """Applies ``fn(path, leaf, choice)`` to the selected leaves; others pass through."""
    treedef = jax.tree.structure(tree, is_leaf=is_leaf)
    out = [
        fn(p, x, c) if c is not False else x
        for p, x, c in leaf_choices(tree, where, is_leaf=is_leaf, model_map=model_map)
    ]
    return jax.tree.unflatten(treedef, out)


def check_same_structure(a: Params, b: Params, what_a: str, what_b: str, *, is_leaf=None) -> None:
    """Raises ``ValueError`` when two trees differ in structure."""
    sa = jax.tree.structure(a, is_leaf=is_leaf)
    sb = jax.tree.structure(b, is_leaf=is_leaf)
    if sa != sb:
        raise ValueError(f"{what_a} tree does not match the {what_b} tree: {sa} vs {sb}")


class LayoutFallbackWarning(UserWarning):
    """Some leaves could not take the requested layout and used the nearest valid one."""


def report_fallbacks(fallbacks: list[str], what: str) -> None:
    """Warns once, one line per leaf, when ``fallbacks`` is not empty."""
    if fallbacks:
        lines = "\n  ".join(fallbacks)
        warnings.warn(f"{what}: {len(fallbacks)} leaf/leaves fell back to another layout:\n  "
                      f"{lines}", LayoutFallbackWarning, stacklevel=3)
