"""Unchanged Flax models run with quantized weights: weight-only and W8A8 stay close to float."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_lab as jol
from jaxopt_lab.app.models import MLP, TeacherCNN


class GeneralEinsum(nn.Module):
    """A tiny model made of the layers Dense does not cover."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = x.reshape(x.shape[0], 8, 8)
        h = nn.DenseGeneral((4, 6), axis=-1)(x)                        # (b, 8, 4, 6)
        h = nn.relu(nn.Einsum((4, 6, 16), "btij,ijk->btk")(h))          # (b, 8, 16)
        h = nn.Conv(5, (3,), padding="CIRCULAR")(h)                     # (b, 8, 5)
        h = nn.DenseGeneral(10, axis=(-2, -1))(h)                       # (b, 10)
        return h


@functools.cache
def _data(n=32):
    x = jol.app.load_digits().test.x[:n]
    return jnp.asarray(x)


MODELS = {
    "teacher": TeacherCNN(features=(8, 16, 16), hidden=32),
    "mlp": MLP(hidden=(64, 32)),
    "general": GeneralEinsum(),
}
N_INT8_LAYERS = {"teacher": 5, "mlp": 3, "general": 4}


def _random_variables(model, x):
    """Random variables of the model's structure, without compiling its initializers."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1], train=False))
    rng = np.random.default_rng(0)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
        if name in ("var", "scale"):
            return rng.uniform(0.5, 1.5, s.shape)
        return rng.normal(0.0, 0.1, s.shape)

    return jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(fill(p, s), jnp.float32), shapes)


@functools.cache
def setup(name):
    model, x = MODELS[name], _data()
    variables = _random_variables(model, x)
    ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return model, variables, jax.jit(functools.partial(jol.quantize, bits=8))(variables), x, ref


@functools.cache
def runner(name):
    """All variants of one model in one jitted function: one compilation per model."""
    model = MODELS[name]

    def run(qvars, x, scales, asym):
        def q(mode, act_scales=None):
            return jol.quantized_apply(model, qvars, x, mode=mode, act_scales=act_scales,
                                       train=False)
        return {
            "weight_only": q("weight_only"),
            "dynamic": q("w8a8", "dynamic"),
            "static": q("w8a8", scales),
            "static_asym": q("w8a8", asym),
            "plain": model.apply(jol.dequantize(qvars), x, train=False),
        }
    return jax.jit(run)


@functools.cache
def observe(name):
    model = MODELS[name]
    return jax.jit(lambda v, stats, x: jol.observe_activations(model, v, stats, x, train=False))


def _rel_err(y, ref):
    return float(jnp.abs(y - ref).max() / jnp.abs(ref).max())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weight_only_and_w8a8_stay_close_to_float(name):
    model, variables, qvars, x, ref = setup(name)
    stats = jol.activation_stats_init(model, variables, x[:16], train=False)
    for xb in (x[:16], x[16:]):
        stats = observe(name)(variables, stats, xb)
    scales = jol.activation_scales(stats)
    asym = jol.activation_scales(stats, method="mse", symmetric=False)
    assert sorted(scales) == sorted(asym) and len(scales) == N_INT8_LAYERS[name]
    outs = runner(name)(qvars, x, scales, asym)
    plain = outs.pop("plain")
    limits = {"weight_only": 0.03, "dynamic": 0.05, "static": 0.07, "static_asym": 0.05}
    for kind, y in outs.items():
        chex.assert_shape(y, ref.shape)
        assert _rel_err(y, ref) < limits[kind], (kind, _rel_err(y, ref))
        assert float(jnp.mean(jnp.argmax(y, -1) == jnp.argmax(ref, -1))) >= 0.9, kind
    # Weight-only is the float model on dequantized weights, up to float rounding (the
    # scale is applied after the contraction, not to the weight).
    chex.assert_trees_all_close(outs["weight_only"], plain, rtol=1e-5,
                                atol=1e-5 * float(jnp.abs(plain).max()))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_w8a8_really_runs_int8_contractions(name):
    model, _, qvars, x, _ = setup(name)
    jaxpr = str(jax.make_jaxpr(
        lambda q, x: jol.quantized_apply(model, q, x, mode="w8a8", train=False))(qvars, x))
    assert jaxpr.count("preferred_element_type=int32") == N_INT8_LAYERS[name]


def test_jit_matches_eager_for_w8a8():
    model, variables, qvars, x, _ = setup("mlp")
    scales = jol.calibrate(model, variables, [x], train=False, symmetric=False)
    eager = jol.quantized_apply(model, qvars, x, mode="w8a8", act_scales=scales, train=False)
    jitted = jax.jit(lambda q, x, s: jol.quantized_apply(model, q, x, mode="w8a8",
                                                         act_scales=s, train=False))
    chex.assert_trees_all_close(eager, jitted(qvars, x, scales), rtol=1e-5, atol=1e-5)


def test_unsupported_kernels_fall_back_to_float():
    model, variables, _, x, _ = setup("teacher")
    # Group-wise int4 and fp8 kernels cannot factor their scales out of an int8 matmul.
    mixed = jol.quantize(variables, bits=8, where=lambda p, leaf: leaf.ndim >= 2 and (
        {"bits": 4, "granularity": "group", "group_size": 8} if "Conv_1" in jax.tree_util.keystr(p)
        else {"dtype": "float8_e4m3fn"} if "Dense_1" in jax.tree_util.keystr(p) else True))

    def both(q, x):
        return [jol.quantized_apply(model, q, x, mode=m, train=False)
                for m in ("w8a8", "weight_only")]
    w8a8, wo = jax.jit(both)(mixed, x)
    assert _rel_err(w8a8, wo) < 0.05
    jaxpr = str(jax.make_jaxpr(
        lambda q, x: jol.quantized_apply(model, q, x, mode="w8a8", train=False))(mixed, x))
    assert jaxpr.count("preferred_element_type=int32") == 3


def test_bad_arguments_raise():
    model, variables, qvars, x, _ = setup("mlp")
    with pytest.raises(ValueError, match="mode"):
        jol.quantized_apply(model, qvars, x, mode="int4")
    with pytest.raises(ValueError, match="act_scales only"):
        jol.quantized_apply(model, qvars, x, act_scales="dynamic")
    with pytest.raises(ValueError, match="act_scales must be"):
        jol.quantized_apply(model, qvars, x, mode="w8a8", act_scales="static")
    scales = jol.calibrate(model, variables, [x], train=False)
    del scales["Dense_1"]
    with pytest.raises(ValueError, match="'Dense_1'"):
        jol.quantized_apply(model, qvars, x, mode="w8a8", act_scales=scales)
    with pytest.raises(ValueError, match="at least one batch"):
        jol.calibrate(model, variables, [])


def test_calibration_pass_under_pmap_matches_one_device():
    model, variables, _, x, _ = setup("mlp")
    n = jax.local_device_count()
    xs = x[: 4 * n].reshape(n, 4, *x.shape[1:])

    def observe(v, stats, xb, axis_name=None):
        return jol.observe_activations(model, v, stats, xb, axis_name=axis_name, num_bins=256,
                                       train=False)

    stats = jax.pmap(functools.partial(observe, axis_name="d"), axis_name="d",
                     in_axes=(None, None, 0))(variables, None, xs)
    single = jax.jit(observe)(variables, None, x[: 4 * n])
    for i in range(n):
        replica = jax.tree.map(lambda a, i=i: a[i], stats)
        chex.assert_trees_all_close(replica, single, rtol=1e-6)
        chex.assert_trees_all_equal(replica["Dense_0"].histogram, single["Dense_0"].histogram)
    np.testing.assert_array_equal(
        jax.tree.map(lambda a: a[0], jol.activation_scales(stats))["Dense_1"][0],
        jol.activation_scales(single)["Dense_1"][0])
