"""The one way every technique decides which leaves of a pytree it touches.

A `where` argument is one of:

* ``None`` -- the default: with a model map (``model_map=``, from
  `jaxopt_lab.model_map`) the leaves the map knows as kernels (the weights of a
  ``dot_general``, convolution or einsum; not embeddings, biases or norms); without one, the
  shape rule: floating-point leaves with ``ndim >= 2``;
* a pytree of bools with the tree's structure, or a prefix of it (a bool at an inner
  node applies to every leaf below it), as in ``optax.masked``;
* a callable ``(path, leaf) -> bool`` over ``jax.tree_util`` key paths.

A callable (or a mask tree) may also return a *mapping* instead of ``True``: the leaf
is selected and the mapping holds per-leaf settings that override the technique's
keyword arguments (mixed precision, for example ``{"bits": 8}`` for the first layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import warnings

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
KeyPath = tuple[Any, ...]
Choice = bool | Mapping[str, Any]
Where = None | Params | Callable[[KeyPath, Any], Choice]


def path_str(path: KeyPath) -> str:
    """Human-readable leaf path, e.g. ``['params']['Dense_0']['kernel']``."""
    return jax.tree_util.keystr(path) or "<root>"


def leaf_overrides(path: KeyPath | str, choice: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The per-leaf settings a `where` choice carries, checked against ``allowed``.

    The one check of per-leaf overrides for every technique: ``True`` (or any
    non-mapping choice) carries none; a mapping with a key outside ``allowed`` raises a
    ``ValueError`` naming the leaf.
    """
    if not isinstance(choice, Mapping):
        return {}
    unknown = sorted(set(choice) - set(allowed))
    if unknown:
        where = path if isinstance(path, str) else path_str(path)
        raise ValueError(f"{where}: unknown per-leaf setting(s) {unknown} in `where`; "
                         f"allowed: {list(allowed)}")
    return dict(choice)


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
    is_choice = lambda x: isinstance(x, (bool, np.bool_, _Overrides)) or x is None  # noqa: E731
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
        if not isinstance(c, (bool, np.bool_, Mapping)) and c is not None:
            raise ValueError(f"`where` mask entries must be bools, got {c!r}")
    return [bool(c) if not isinstance(c, Mapping) else c for c in choices]


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

    ``choice`` is ``False`` (untouched), ``True`` (selected) or a mapping of per-leaf
    setting overrides (selected). ``model_map`` only changes the default selection.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    if where is None:
        rule = default_where if model_map is None else map_kernels(model_map)
        return [(p, x, rule(p, x)) for p, x in flat]
    if callable(where) and not isinstance(where, Mapping):
        out = []
        for p, x in flat:
            c = where(p, x)
            if not isinstance(c, Mapping):
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
