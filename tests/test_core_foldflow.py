"""Fold targets read from the jaxpr (core/foldflow.py, ModelMap.fold_target): the right
norm or previous kernel for stock linen and NNX transformer layers, None with a reason
through GELU, residual adds and attention scores, and every target exact: folding a
random positive scale into it and into its kernels' rows leaves the float output alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol
from _fold_models import FFN, HEADS, D, HandAttention, NNXBlock, PostLN, PreLN  # noqa: F401
from jaxopt_lab.core import foldflow

def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (2, 5, D))


def _linen(model):
    x = _x()
    v = model.init(jax.random.key(1), x)
    # Nonzero biases and norm offsets, so a missed bias would show.
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
    return model, v, x, jol.model_map(model, v, x)


def _paths(fls):
    return [tuple(fl.path[-2:]) + (fl.axes,) for fl in fls]


def test_preln_linen_targets():
    _, _, _, mm = _linen(PreLN())
    qkv = mm.fold_target(("params", "attn", "query", "kernel"))
    assert qkv.kind == "norm"
    assert _paths(qkv.divide) == [("ln0", "scale", (0,)), ("ln0", "bias", (0,))]
    assert [fl.path[-2] for fl in qkv.kernels] == ["query", "key", "value"]
    assert mm.fold_target(("params", "attn", "value", "kernel")) == qkv
    out = mm.fold_target(("params", "attn", "out", "kernel"))
    assert out.kind == "kernel" and out.size == D
    assert _paths(out.divide) == [("value", "kernel", (1, 2)), ("value", "bias", (0, 1))]
    assert _paths(out.kernels) == [("out", "kernel", (0, 1))]
    rms = mm.fold_target(("params", "gelu_in", "kernel"))
    assert rms.kind == "norm" and _paths(rms.divide) == [("rms", "scale", (0,))]
    assert mm.fold_target(("params", "gelu_out", "kernel")) is None
    assert "not positively homogeneous" in mm.fold_reason(("params", "gelu_out", "kernel"))
    relu = mm.fold_target(("params", "relu_out", "kernel"))  # through ReLU and max-pool
    assert relu.kind == "kernel"
    assert _paths(relu.divide) == [("relu_in", "kernel", (1,)), ("relu_in", "bias", (0,))]
    assert mm.fold_reason(("params", "relu_out", "kernel")) is None


def test_postln_minilm_block_targets():
    """Post-LN: the norm output is also the residual stream, so only attn_out folds."""
    _, _, _, mm = _linen(PostLN())
    for k in ("query", "key", "value"):
        assert mm.fold_target(("params", k, "kernel")) is None
        assert "model's input" in mm.fold_reason(("params", k, "kernel"))
    t = mm.fold_target(("params", "attn_out", "kernel"))
    assert t.kind == "kernel"
    assert _paths(t.divide) == [("value", "kernel", (1,)), ("value", "bias", (0,))]
    assert mm.fold_target(("params", "intermediate", "kernel")) is None
    assert "residual" in mm.fold_reason(("params", "intermediate", "kernel"))
    assert "erf" in mm.fold_reason(("params", "output", "kernel"))


def test_hand_attention_targets():
    _, _, _, mm = _linen(HandAttention())
    t = mm.fold_target(("params", "q", "kernel"))
    assert t.kind == "norm" and [fl.path[-2] for fl in t.kernels] == ["q", "k", "v"]
    out = mm.fold_target(("params", "out", "kernel"))
    assert _paths(out.divide) == [("v", "kernel", (1,)), ("v", "bias", (0,))]
    assert _paths(out.kernels) == [("out", "kernel", (0, 1))]


def test_nnx_targets():
    model = NNXBlock(nnx.Rngs(0))
    mm = jol.model_map(model, None, _x())
    qkv = mm.fold_target(("attn", "query", "kernel"))
    assert qkv.kind == "norm"
    assert _paths(qkv.divide) == [("ln", "scale", (0,)), ("ln", "bias", (0,))]
    assert [fl.path[-2] for fl in qkv.kernels] == ["query", "key", "value"]
    out = mm.fold_target(("attn", "out", "kernel"))
    assert _paths(out.divide) == [("value", "kernel", (1, 2)), ("value", "bias", (0, 1))]
    assert mm.fold_target(("up", "kernel")).divide[0].path == ("rms", "scale")
    assert mm.fold_target(("down", "kernel")).divide[0].path == ("up", "kernel")
    assert mm.fold_target(("gup", "kernel")).divide[0].path == ("rms2", "scale")
    assert mm.fold_target(("gdown", "kernel")) is None
    assert mm.fold_reason(("gdown", "kernel"))


def test_shared_and_tied_weights_have_no_target():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(D, name="d")
            return d(nn.relu(d(x)))

    _, _, _, mm = _linen(Tied())
    assert mm.fold_target(("params", "d", "kernel")) is None
    assert "2 contractions" in mm.fold_reason(("params", "d", "kernel"))


def _exact(apply, tree, mm, seed, targets):
    y0 = apply(tree)
    rng = np.random.default_rng(seed)
    for t in targets:
        s = np.exp(rng.uniform(-2, 2, t.size)).astype(np.float32)
        y1 = apply(foldflow.fold_scale(tree, t, s))
        np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=2e-4, atol=2e-4)


def _targets(mm):
    found = {mm.fold_target(k) for k in mm.kernels()}
    return sorted((t for t in found if t is not None), key=lambda t: t.divide[0].path)


@pytest.mark.parametrize("cls", [PreLN, HandAttention, PostLN])
@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1))
def test_linen_targets_are_exact(cls, seed):
    model, v, x, mm = _linen(cls())
    targets = _targets(mm)
    assert targets
    _exact(jax.jit(lambda t: model.apply(t, x)), v, mm, seed, targets)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1))
def test_nnx_targets_are_exact(seed):
    model = NNXBlock(nnx.Rngs(0))
    x = _x()
    mm = jol.model_map(model, None, x)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a + 0.1, state)
    targets = _targets(mm)
    assert len(targets) == 5
    _exact(jax.jit(lambda s: nnx.merge(graphdef, s)(x)), state, mm, seed, targets)


def test_fold_scale_checks():
    _, v, _, mm = _linen(HandAttention())
    t = mm.fold_target(("params", "out", "kernel"))
    with pytest.raises(ValueError, match="expected"):
        foldflow.fold_scale(v, t, np.ones(3))
    with pytest.raises(ValueError, match="positive"):
        foldflow.fold_scale(v, t, -np.ones(D))
    with pytest.raises(ValueError, match="not in the tree"):
        foldflow.fold_scale({"x": jnp.ones(2)}, t, np.ones(D))
    # A subtree (variables["params"]) works as the whole tree does.
    a = foldflow.fold_scale(v, t, np.full(D, 2.0))["params"]
    b = foldflow.fold_scale(v["params"], t, np.full(D, 2.0))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_rows_to_channels_roundtrip():
    s = np.arange(12.0)
    # a kernel (3, 4, 5) contracting (0, 1) in row order, channels ordered (1, 0)
    ch = np.asarray(foldflow.rows_to_channels(s, (3, 4, 5), (0, 1), (1, 0)))
    np.testing.assert_array_equal(ch, s.reshape(3, 4).T.reshape(-1))


def test_two_readers_with_different_needs_have_no_target():
    """A norm output read by a Dense and, through GELU, by another: no exact fold."""

    class TwoReaders(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(name="ln")(x)
            return nn.Dense(D, name="a")(h) + nn.Dense(D, name="b")(nn.gelu(h))

    _, _, _, mm = _linen(TwoReaders())
    for k in ("a", "b"):
        assert mm.fold_target(("params", k, "kernel")) is None
    assert "not positively homogeneous" in mm.fold_reason(("params", "a", "kernel"))
