"""Compaction: the smaller model computes what the channel-masked model computes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_lab as jol
from jaxopt_lab.pruning.compaction import compact, expand_channel_mask
from jaxopt_lab.app.models import MLP, NNXMLP, TeacherCNN

X = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))


@functools.lru_cache
def random_variables(model, seed=0):
    """Init, then random weights and BatchNorm statistics (so nothing is trivially zero)."""
    v = jax.jit(model.init)(jax.random.PRNGKey(seed), X[:1])
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if "var" in jax.tree_util.keystr(path):
            return jnp.asarray(rng.uniform(0.2, 2.0, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape) * 0.3, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, v)


@functools.lru_cache
def channel_mask_fn(head):
    def where(path, leaf):
        return leaf.ndim >= 2 and head not in jax.tree_util.keystr(path)

    return jax.jit(lambda p, s: jol.channel_mask(p, s, where=where))


@pytest.mark.parametrize(
    "model,head,sparsity",
    [(TeacherCNN(), "Dense_1", 0.5), (TeacherCNN(), "Dense_1", 0.9), (MLP(), "Dense_2", 0.6)],
    ids=["teacher50", "teacher90", "mlp60"],
)
def test_compacted_model_equals_masked_model(model, head, sparsity):
    v = random_variables(model)
    mask = channel_mask_fn(head)(v["params"], sparsity)
    expanded = expand_channel_mask(model, v, mask, X[:1])
    want = jax.jit(model.apply)({**v, "params": jol.apply_mask(v["params"], expanded)}, X)
    small, sv = compact(model, v, mask, X[:1])
    got = jax.jit(small.apply)(sv, X)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    kept = jol.app.param_count(sv["params"])
    assert kept < jol.app.param_count(v["params"]) * (1 - sparsity) + 2000
    if "batch_stats" in v:
        assert jax.tree.structure(sv["batch_stats"]) == jax.tree.structure(v["batch_stats"])


def test_mixed_mask_zeroes_unstructured_entries_and_removes_dead_channels():
    model = MLP(hidden=(16, 8))
    v = jax.jit(model.init)(jax.random.PRNGKey(0), X[:1])
    mask = jol.magnitude_mask(v["params"], 0.3)
    mask["Dense_0"]["kernel"] = mask["Dense_0"]["kernel"].at[:, :4].set(False)
    small, sv = compact(model, v, mask, X[:1])
    assert small.hidden == (12, 8)
    want = model.apply({"params": jol.apply_mask(
        v["params"], expand_channel_mask(model, v, mask, X[:1]))}, X)
    np.testing.assert_allclose(np.asarray(small.apply(sv, X)), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("model", [MLP(hidden=(8,)), TeacherCNN()], ids=["mlp", "teacher"])
def test_nothing_pruned_is_identity(model):
    v = random_variables(model)
    keep_all = jax.tree.map(lambda x: jnp.ones(x.shape, bool), v["params"])
    small, sv = compact(model, v, keep_all, X[:1])
    assert small == model  # same widths: the same module
    assert jax.tree.structure(sv) == jax.tree.structure(v)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(sv), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(small.apply(sv, X)), np.asarray(model.apply(v, X)))


def test_fully_masked_head_keeps_its_outputs_and_zeroes_them():
    model = MLP(hidden=(8,))
    v = random_variables(model)
    pruned_head = jax.tree.map(lambda x: jnp.ones(x.shape, bool), v["params"])
    pruned_head["Dense_1"]["kernel"] = jnp.zeros((8, 10), bool)
    small, sv = compact(model, v, pruned_head, X[:1])
    # The head's outputs are the model's: never removed, only masked.
    assert small.hidden == (8,) and sv["params"]["Dense_1"]["kernel"].shape == (8, 10)
    assert not np.asarray(sv["params"]["Dense_1"]["kernel"]).any()
    np.testing.assert_array_equal(np.asarray(sv["params"]["Dense_0"]["kernel"]),
                                  np.asarray(v["params"]["Dense_0"]["kernel"]))
    want = model.apply({"params": jol.apply_mask(
        v["params"], expand_channel_mask(model, v, pruned_head, X[:1]))}, X)
    got = small.apply(sv, X)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # A zero head kernel leaves only its bias: every example gets the same logits.
    np.testing.assert_allclose(np.asarray(got), np.broadcast_to(
        np.asarray(v["params"]["Dense_1"]["bias"]), got.shape), rtol=1e-6)


def test_bad_input():
    model = MLP(hidden=(8,))
    v = model.init(jax.random.PRNGKey(0), X[:1])
    dead = jax.tree.map(lambda x: jnp.ones(x.shape, bool), v["params"])
    dead["Dense_0"]["kernel"] = jnp.zeros_like(dead["Dense_0"]["kernel"])
    with pytest.raises(ValueError, match="Dense_0 would lose all its channels"):
        compact(model, v, dead, X[:1])
    with pytest.raises(ValueError, match="mask tree does not match"):
        compact(model, v, {"Dense_0": dead["Dense_0"]}, X[:1])
    with pytest.raises(TypeError, match="resize"):
        from jaxopt_lab.pruning.compaction import _default_resize

        _default_resize(NNXMLP, [1])
