"""capture_features pulls submodule outputs out of unchanged linen models; projections."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_lab as jol
from jaxopt_lab.distill import capture_features, init_projection, layer_names, project


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="inner")(x)
        self.sow("intermediates", "pre_act", h)
        return nn.relu(h)


class Net(nn.Module):
    """A nested model that also sows a value and reuses one Dense twice."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Block(name="block")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        shared = nn.Dense(6, name="shared")
        x = shared(shared(x))
        return nn.Dense(3, name="head")(x)


@pytest.fixture(scope="module")
def net():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
    model = Net()
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), x), x


def test_output_is_unchanged_and_features_are_the_layer_outputs(net):
    model, variables, x = net
    out, feats = capture_features(model, variables, x, layers=["block/inner", "block", "bn"])
    chex.assert_trees_all_equal(out, model.apply(variables, x))
    p = variables["params"]["block"]["inner"]
    inner = x @ p["kernel"] + p["bias"][None]
    np.testing.assert_allclose(feats["block/inner"], inner, rtol=1e-6)
    np.testing.assert_allclose(feats["block"], jax.nn.relu(inner), rtol=1e-6)
    assert set(feats) == {"block/inner", "block", "bn"}


def test_sown_values_and_predicates(net):
    model, variables, x = net
    _, feats = capture_features(model, variables, x, layers=lambda n: n.startswith("block"))
    assert set(feats) == {"block", "block/inner", "block/pre_act"}
    np.testing.assert_allclose(feats["block/pre_act"], feats["block/inner"], rtol=1e-6)


def test_train_mode_returns_updated_collections_like_apply(net):
    model, variables, x = net
    (out, updates), feats = capture_features(
        model, variables, x, layers=["bn"], train=True, mutable=["batch_stats"])
    want_out, want_updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(out, want_out, rtol=1e-6)
    chex.assert_trees_all_close(updates, want_updates, rtol=1e-6)
    assert set(updates) == {"batch_stats"}
    assert feats["bn"].shape == (4, 6)


def test_works_under_jit_and_grad(net):
    model, variables, x = net

    def loss(params):
        _, feats = capture_features(model, {**variables, "params": params}, x, layers=["bn"])
        return jnp.sum(feats["bn"] ** 2)

    g = jax.jit(jax.grad(loss))(variables["params"])
    assert float(jnp.abs(g["block"]["inner"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g["head"]["kernel"]).sum()) == 0  # the head is after the feature
    chex.assert_trees_all_close(jax.grad(loss)(variables["params"]), g, rtol=1e-5)


def test_layer_names_and_errors(net):
    model, variables, x = net
    names = layer_names(model, variables, x)
    assert {"block", "block/inner", "block/pre_act", "bn", "head", "shared"} <= set(names)
    with pytest.raises(ValueError, match="known layers"):
        capture_features(model, variables, x, layers=["nope"])
    with pytest.raises(ValueError, match="ran 2 times"):
        capture_features(model, variables, x, layers=["shared"])
    with pytest.raises(ValueError, match="sequence of layer names"):
        capture_features(model, variables, x, layers="bn")
    with pytest.raises(ValueError, match="mutable=True"):
        capture_features(model, variables, x, layers=["bn"], mutable=True)


def test_reference_cnns_expose_hint_layers():
    x = jnp.zeros((2, 8, 8, 1))
    teacher, student = jol.app.TeacherCNN(), jol.app.StudentCNN()
    t_vars = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), x))
    s_vars = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0), x))
    assert "BatchNorm_1" in layer_names(teacher, t_vars, x)
    _, t_feats = jax.eval_shape(lambda v: capture_features(teacher, v, x, layers=["BatchNorm_1"]),
                                t_vars)
    _, s_feats = jax.eval_shape(lambda v: capture_features(student, v, x, layers=["BatchNorm_0"]),
                                s_vars)
    assert t_feats["BatchNorm_1"].shape == (2, 8, 8, 64)
    assert s_feats["BatchNorm_0"].shape == (2, 8, 8, 16)


def test_projection_is_a_one_by_one_convolution():
    key = jax.random.PRNGKey(0)
    proj = init_projection(key, 3, 5)
    assert proj["kernel"].shape == (3, 5) and proj["bias"].shape == (5,)
    chex.assert_trees_all_equal(proj["bias"], jnp.zeros(5))
    proj["bias"] = jnp.arange(5.0)
    f = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), jnp.float32)
    conv = nn.Conv(5, (1, 1))
    want = conv.apply({"params": {"kernel": proj["kernel"][None, None], "bias": proj["bias"]}}, f)
    np.testing.assert_allclose(project(proj, f), want, rtol=1e-5, atol=1e-6)
    no_bias = init_projection(key, 3, 5, use_bias=False, dtype=jnp.bfloat16)
    assert set(no_bias) == {"kernel"} and no_bias["kernel"].dtype == jnp.bfloat16
    chex.assert_shape(project(no_bias, f.astype(jnp.bfloat16)), (2, 4, 4, 5))


def test_projection_errors():
    with pytest.raises(ValueError, match="positive"):
        init_projection(jax.random.PRNGKey(0), 0, 4)
    proj = init_projection(jax.random.PRNGKey(0), 3, 4)
    with pytest.raises(ValueError, match="input channels"):
        project(proj, jnp.zeros((2, 4)))
