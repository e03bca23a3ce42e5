"""Compaction of models built from stock Flax layers (linen and NNX), read from the jaxpr.

The property: the compacted model computes what the model on its expanded-masked
variables computes. With small integer weights and inputs every sum is exact in float32,
so MLPs are compared bit for bit; nets with BatchNorm (``rsqrt``) within rounding.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.pruning.compaction import compact, compact_report, expand_channel_mask
from tests import _flax_models as F


class LinenMLP(nn.Module):
    widths: tuple[int, ...] = (4,)
    act: str = "relu"

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = getattr(nn, self.act)(nn.Dense(w)(x))
        return nn.Dense(3)(x)


class NnxMLP(nnx.Module):
    def __init__(self, din, widths, rngs, batch_norm=False):
        dims = (din, *widths)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims, dims[1:])])
        self.bns = nnx.List([nnx.BatchNorm(b, use_running_average=True, rngs=rngs)
                             for b in widths]) if batch_norm else None
        self.head = nnx.Linear(dims[-1], 3, rngs=rngs)

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.bns is not None:
                x = self.bns[i](x)
            x = nnx.gelu(x)
        return self.head(x)


def resize_widths(model, widths):
    return model.clone(widths=tuple(widths))


def resize_features(model, widths):
    return model.clone(features=tuple(widths))


def integer_like(tree, rng):
    """Small integer values (statistics positive): every product and sum is exact."""
    def fill(path, leaf):
        if "var" in jax.tree_util.keystr(path):
            return jnp.asarray(rng.integers(1, 3, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.integers(-3, 4, leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, tree)


def random_mask(params, rng, dead_fraction, keep_fraction=0.8):
    """Kernel channels dead at random (each kernel keeps one), other entries masked too."""
    def make(leaf):
        m = rng.random(leaf.shape) < keep_fraction
        if leaf.ndim >= 2:
            dead = rng.random(leaf.shape[-1]) < dead_fraction
            dead[rng.integers(leaf.shape[-1])] = False
            flat = (m & ~dead).reshape(-1, leaf.shape[-1])
            flat[0, ~dead] = True  # an alive channel keeps at least one entry
            m = flat.reshape(leaf.shape)
        return jnp.asarray(m)
    return jax.tree.map(make, params)


def masked_linen(model, variables, mask, x):
    expanded = expand_channel_mask(model, variables, mask, x)
    assert jax.tree.structure(expanded) == jax.tree.structure(mask)
    return model.apply({**variables, "params": jol.apply_mask(variables["params"], expanded)},
                       x)


def masked_nnx(module, mask, x):
    expanded = expand_channel_mask(module, None, mask, x)
    copy = nnx.merge(*nnx.split(module))
    nnx.update(copy, jol.apply_mask(nnx.state(module, nnx.Param), expanded))
    return copy(x)


widths_st = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@settings(max_examples=15)
@given(widths=widths_st, seed=st.integers(0, 2**16), dead=st.sampled_from([0.0, 0.4, 0.9]),
       act=st.sampled_from(["relu", "gelu", "tanh"]))
def test_linen_mlp_compacted_equals_masked_exactly(widths, seed, dead, act):
    rng = np.random.default_rng(seed)
    model = LinenMLP(widths, act)
    x = jnp.asarray(rng.integers(-2, 3, (4, 5)), jnp.float32)
    v = integer_like(model.init(jax.random.PRNGKey(0), x), rng)
    mask = random_mask(v["params"], rng, dead)
    small, sv, report = compact(model, v, mask, x, resize=resize_widths, return_report=True)
    want = masked_linen(model, v, mask, x)
    np.testing.assert_array_equal(np.asarray(small.apply(sv, x)), np.asarray(want))
    assert report.skipped == () or all(s.layer == f"Dense_{len(widths)}"
                                       for s in report.skipped)
    for i, w in enumerate(small.widths):
        kernel = np.asarray(mask[f"Dense_{i}"]["kernel"])
        assert w == int(kernel.any(axis=0).sum()) == sv["params"][f"Dense_{i}"]["bias"].shape[0]


@settings(max_examples=10)
@given(widths=widths_st, seed=st.integers(0, 2**16), dead=st.sampled_from([0.0, 0.5]),
       batch_norm=st.booleans())
def test_nnx_mlp_compacted_equals_masked(widths, seed, dead, batch_norm):
    rng = np.random.default_rng(seed)
    module = NnxMLP(5, widths, nnx.Rngs(seed), batch_norm)
    nnx.update(module, integer_like(nnx.state(module), rng))
    x = jnp.asarray(rng.integers(-2, 3, (4, 5)), jnp.float32)
    mask = random_mask(nnx.state(module, nnx.Param), rng, dead)
    small, state = compact(module, None, mask, x)
    want = masked_nnx(module, mask, x)
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(want), rtol=1e-5, atol=1e-4)
    for layer, m in zip(small.layers, [mask["layers"][i]["kernel"] for i in range(len(widths))]):
        assert layer.out_features == layer.kernel.shape[1] == int(np.asarray(m).any(0).sum())
    assert jax.tree.structure(state) == jax.tree.structure(nnx.state(small))


@settings(max_examples=8)
@given(features=st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple),
       channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**16),
       dead=st.sampled_from([0.3, 0.7]))
def test_conv_nets_with_batch_norm_compacted_equal_masked(features, channels, seed, dead):
    rng = np.random.default_rng(seed)
    x = F.images(channels, seed=seed)
    model = F.LinenConvNet(features)
    v = integer_like(model.init(jax.random.PRNGKey(0), x), rng)
    mask = random_mask(v["params"], rng, dead)
    small, sv = compact(model, v, mask, x, resize=resize_features)
    np.testing.assert_allclose(np.asarray(small.apply(sv, x)),
                               np.asarray(masked_linen(model, v, mask, x)), rtol=1e-5, atol=1e-3)
    assert jax.tree.structure(sv) == jax.tree.structure(v)
    for i, f in enumerate(small.features):
        assert sv["batch_stats"][f"BatchNorm_{i}"]["mean"].shape == (f,)

    module = F.NnxConvNet(channels, nnx.Rngs(seed), features)
    nnx.update(module, integer_like(nnx.state(module), rng))
    mask = random_mask(nnx.state(module, nnx.Param), rng, dead)
    small, _ = compact(module, None, mask, x)
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(masked_nnx(module, mask, x)),
                               rtol=1e-5, atol=1e-3)
    assert [bn.num_features for bn in small.bns] == [c.kernel.shape[-1] for c in small.convs]


def test_nnx_transformer_mlp_up_projection_is_compacted_into_the_einsum():
    module, ids = F.nnx_transformer()
    params = nnx.state(module, nnx.Param)

    def up_kernels(path, leaf):
        return "up" in jax.tree_util.keystr(path) and leaf.ndim == 3

    mask = jol.channel_mask(params, 0.5, where=up_kernels)
    small, _, report = compact(module, None, mask, ids, return_report=True)
    assert [(c.layer, c.after) for c in report.compacted] == [
        ("blocks/0/up", 64), ("blocks/1/up", 64)]
    assert small.blocks[0].up.kernel.shape == (F.EMBED, 2, 64)
    assert small.blocks[0].down.kernel.shape == (2, 64, F.EMBED)
    np.testing.assert_allclose(np.asarray(small(ids)), np.asarray(masked_nnx(module, mask, ids)),
                               rtol=1e-5, atol=1e-5)


def test_transformer_channels_that_cannot_go_are_reported_not_removed():
    model, v, ids = F.linen_transformer()
    mask = jol.channel_mask(v["params"], 0.5, where=lambda p, w: w.ndim >= 2 and "Embed"
                            not in jax.tree_util.keystr(p))
    report = compact_report(model, v, mask, ids)
    reasons = {(s.layer, s.axis): s.reason for s in report.skipped}
    attn = "LinenBlock_0/MultiHeadDotProductAttention_0"
    assert "attention" in reasons[(f"{attn}/query", 2)]
    assert "residual" in reasons[("LinenBlock_0/Einsum_0", 2)]
    assert "tied embedding" in reasons[("Dense_0", 1)]
    assert {c.layer for c in report.compacted} == {"LinenBlock_0/DenseGeneral_0",
                                                   "LinenBlock_1/DenseGeneral_0"}


def test_residual_and_sigmoid_keep_their_channels():
    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(x.shape[-1], name="Dense_0")(x))
            return nn.Dense(2, name="Dense_1")(x + h)

    x = jnp.ones((2, 4))
    for model, reason in [(Residual(), "residual"), (LinenMLP((4,), "sigmoid"), "not zero")]:
        v = model.init(jax.random.PRNGKey(0), x)
        mask = jax.tree.map(lambda w: jnp.ones(w.shape, bool), v["params"])
        mask["Dense_0"]["kernel"] = mask["Dense_0"]["kernel"].at[:, :2].set(False)
        with pytest.warns(UserWarning, match=reason):
            small, sv, report = compact(model, v, mask, x, return_report=True)
        assert small is model and report.compacted == ()
        np.testing.assert_array_equal(np.asarray(small.apply(sv, x)),
                                      np.asarray(masked_linen(model, v, mask, x)))


def test_linen_model_without_resize_says_how():
    model = LinenMLP((4,))
    x = jnp.ones((2, 5))
    v = model.init(jax.random.PRNGKey(0), x)
    mask = jax.tree.map(lambda w: jnp.ones(w.shape, bool), v["params"])
    mask["Dense_0"]["kernel"] = mask["Dense_0"]["kernel"].at[:, 0].set(False)
    with pytest.raises(TypeError, match="resize=lambda model, widths"):
        compact(model, v, mask, x)
    with pytest.raises(ValueError, match="does not match the compacted"):
        compact(model, v, mask, x, resize=lambda m, w: m)
    small, _ = compact(model, v, mask, x, resize=resize_widths)
    assert small.widths == (3,)
