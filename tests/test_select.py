"""_select.py: the one `where` selector (default, mask tree or prefix, callable, overrides)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab import _select

TREE = {"Dense_0": {"kernel": np.ones((3, 4), np.float32), "bias": np.ones(4, np.float32)},
        "Embed_0": {"embedding": jnp.ones((5, 3), jnp.bfloat16)},
        "ints": np.ones((2, 2), np.int32), "scalar": np.float32(2.0)}


def test_default_where_picks_float_leaves_with_ndim_2_or_more():
    sel = _select.selection(TREE)
    assert sel == {"Dense_0": {"kernel": True, "bias": False}, "Embed_0": {"embedding": True},
                   "ints": False, "scalar": False}


def test_mask_tree_prefix_broadcasts_and_overrides_pass_through():
    where = {"Dense_0": {"kernel": {"bits": 4}, "bias": True}, "Embed_0": False,
             "ints": False, "scalar": False}
    choices = {_select.path_str(p): c for p, _, c in _select.leaf_choices(TREE, where)}
    assert choices["['Dense_0']['kernel']"] == {"bits": 4}
    assert choices["['Dense_0']['bias']"] is True
    assert choices["['Embed_0']['embedding']"] is False
    prefix = {"Dense_0": True, "Embed_0": False, "ints": False, "scalar": False}
    assert _select.selection(TREE, prefix)["Dense_0"] == {"kernel": True, "bias": True}


def test_callable_where_gets_paths_and_may_return_overrides():
    def where(path, leaf):
        name = _select.path_str(path)
        return {"bits": 8} if "kernel" in name else "bias" in name

    choices = [c for _, _, c in _select.leaf_choices(TREE, where)]
    assert choices.count(True) == 1 and {"bits": 8} in choices
    assert all(isinstance(c, (bool, dict)) for c in choices)


def test_bad_masks_raise_value_errors():
    with pytest.raises(ValueError, match="does not match"):
        _select.selection([np.ones(2), np.ones(2)], [True])
    with pytest.raises(ValueError, match="must be bools"):
        _select.selection({"a": np.ones(2)}, {"a": "yes"})
    with pytest.raises(ValueError, match="does not match"):
        _select.check_same_structure({"a": 1}, {"b": 1}, "mask", "params")


def test_a_dict_with_other_keys_than_the_tree_is_read_as_overrides():
    # The documented rule that tells a mask dict from a settings mapping: the same keys as
    # the tree's dict there. A partial mask dict is therefore a settings mapping for every
    # leaf (the technique then rejects the unknown setting names).
    choices = [c for _, _, c in _select.leaf_choices(TREE, {"Dense_0": True})]
    assert choices == [{"Dense_0": True}] * len(jax.tree.leaves(TREE))


def test_path_str_names_the_root():
    assert _select.path_str(()) == "<root>"
    assert _select.leaf_choices(np.ones((2, 2), np.float32))[0][0] == ()


@given(st.lists(st.booleans(), min_size=1, max_size=6))
def test_map_selected_touches_exactly_the_selected_leaves(flags):
    tree = [np.full((2, 2), i, np.float32) for i in range(len(flags))]
    out = _select.map_selected(lambda p, x, c: x + 100, tree, list(flags))
    for x, y, f in zip(tree, out, flags, strict=True):
        if f:
            np.testing.assert_array_equal(y, x + 100)
        else:
            assert y is x
    # A selection is itself a valid `where`, selecting the same leaves.
    assert _select.selection(tree, _select.selection(tree, list(flags))) == list(flags)
    # leaf_choices follows jax.tree.leaves order.
    leaves = [x for _, x, _ in _select.leaf_choices(tree, list(flags))]
    assert all(a is b for a, b in zip(leaves, jax.tree.leaves(tree), strict=True))
