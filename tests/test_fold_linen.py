"""bn_fold on linen models (jaxopt_lab/fold/linen.py): exact equivalence and its edges."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fold_testing import leaves_equal, random_variables, rel_err
from flax.core import FrozenDict, freeze, unfreeze
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.fold import arith
from jaxopt_lab.app.models import StudentCNN, TeacherCNN

DIGITS = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)


class Block(nn.Module):
    """A ResNet basic block; a strided/widening block gets a 1x1 projection shortcut."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train)
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if x.shape != y.shape:
            x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False, name="proj")(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        for features, strides in ((8, 1), (16, 2), (16, 1)):
            x = Block(features, strides)(x, train)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


@functools.lru_cache(maxsize=None)
def _jit_apply(model):
    return jax.jit(functools.partial(model.apply, train=False))


def _assert_folds_exactly(model, x, variables, n_expected):
    folded, report = jol.bn_fold(model, variables, x, train=False, return_report=True)
    assert len(report.folded) == n_expected and not report.skipped, report
    apply = _jit_apply(model)
    assert rel_err(apply(folded, x), apply(variables, x)) < 1e-5
    return folded, report


def test_teacher_cnn_folds_exactly():
    model = TeacherCNN()
    v = random_variables(model, DIGITS, train=False)
    folded, report = _assert_folds_exactly(model, DIGITS, v, 3)
    assert {p.shift_in for p in report.folded} == {arith.SHIFT_IN_BN_BIAS}
    for i in range(3):
        assert not np.array_equal(folded["params"][f"Conv_{i}"]["kernel"],
                                  v["params"][f"Conv_{i}"]["kernel"])
        assert np.all(np.asarray(folded["batch_stats"][f"BatchNorm_{i}"]["mean"]) == 0)
        assert np.all(np.asarray(folded["params"][f"BatchNorm_{i}"]["scale"]) == 1)
    assert jax.tree.structure(folded) == jax.tree.structure(v)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(v)))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(folded))


def test_resnet_with_projection_shortcut_folds_exactly():
    model = ResNet()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
    _, report = _assert_folds_exactly(model, x, random_variables(model, x, seed=1), 8)
    pairs = {(p.layer, p.batch_norm) for p in report.folded}
    assert ("Block_1/proj", "Block_1/proj_bn") in pairs
    assert ("Conv_0", "BatchNorm_0") in pairs


def test_fold_twice_is_a_noop_and_input_untouched():
    model = TeacherCNN()
    v = random_variables(model, DIGITS, seed=2)
    before = jax.tree.map(np.array, v)
    once = jol.bn_fold(model, v, DIGITS)
    assert leaves_equal(v, before)
    assert leaves_equal(jol.bn_fold(model, once, DIGITS), once)


def test_sharded_variables_keep_their_sharding():
    model = StudentCNN()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    v = jax.device_put(random_variables(model, DIGITS, seed=5), replicated)
    folded = jol.bn_fold(model, v, DIGITS)
    for leaf in jax.tree.leaves(folded):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
    assert rel_err(_jit_apply(model)(folded, DIGITS), _jit_apply(model)(v, DIGITS)) < 1e-5


def test_frozen_dict_in_frozen_dict_out():
    model = StudentCNN()
    v = random_variables(model, DIGITS, seed=3)
    folded = jol.bn_fold(model, freeze(v), DIGITS)
    assert isinstance(folded, FrozenDict)
    assert leaves_equal(unfreeze(folded), jol.bn_fold(model, v, DIGITS))


# Randomly generated Conv/BN stacks: (kind, kernel, groups, features, use_bias, scale, beta).
LAYER = st.tuples(st.sampled_from(["conv", "conv_t", "conv_tk"]), st.integers(1, 3),
                  st.sampled_from([1, 2, 4]), st.sampled_from([4, 8]), st.booleans(),
                  st.booleans(), st.booleans())


class Stack(nn.Module):
    spec: tuple

    @nn.compact
    def __call__(self, x, train: bool = False):
        for kind, k, groups, features, bias, scale, beta in self.spec:
            if kind == "conv":
                x = nn.Conv(features, (k, k), feature_group_count=groups, use_bias=bias)(x)
            else:
                x = nn.ConvTranspose(features, (k, k), use_bias=bias,
                                     transpose_kernel=kind == "conv_tk")(x)
            x = nn.BatchNorm(use_running_average=not train, use_scale=scale, use_bias=beta,
                             epsilon=1e-3)(x)
            x = jnp.tanh(x)
        return x


@settings(max_examples=12)
@given(spec=st.lists(LAYER, min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_random_conv_bn_stacks_fold_exactly(spec, seed):
    model = Stack(tuple(spec))
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 5, 5, 4)), jnp.float32)
    v = random_variables(model, x, seed=seed)
    folded, report = _assert_folds_exactly(model, x, v, len(spec))
    want = {arith.SHIFT_IN_LAYER if s[4] else arith.SHIFT_IN_BN_BIAS if s[6]
            else arith.SHIFT_IN_BN_MEAN for s in spec}
    assert {p.shift_in for p in report.folded} == want
    assert leaves_equal(jol.bn_fold(model, folded, x), folded)


@pytest.mark.parametrize("features,axis", [((3, 5), -1), ((3, 5), (-2, -1)), (5, -1)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_general_folds_exactly(features, axis, use_bias):
    model = nn.Sequential([nn.DenseGeneral(features, use_bias=use_bias),
                           nn.BatchNorm(use_running_average=True, axis=axis, use_scale=False)])
    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 7)), jnp.float32)
    v = random_variables(model, x, seed=4)
    assert rel_err(model.apply(jol.bn_fold(model, v, x), x), model.apply(v, x)) < 1e-5


def test_unfoldable_batchnorms_are_left_untouched():
    model = nn.Sequential([nn.Dense(4), nn.relu, nn.BatchNorm(use_running_average=True)])
    x = jnp.ones((3, 2))
    v = random_variables(model, x)
    folded, report = jol.bn_fold(model, v, x, return_report=True)
    assert not report.folded and len(report.skipped) == 1
    assert leaves_equal(folded, v)


def test_training_mode_warns_and_changes_nothing():
    model = StudentCNN()
    v = random_variables(model, DIGITS)
    with pytest.warns(UserWarning, match="training mode.*train=False"):
        folded = jol.bn_fold(model, v, DIGITS, train=True)
    assert leaves_equal(folded, v)


def test_bad_inputs_raise():
    model = StudentCNN()
    v = random_variables(model, DIGITS)
    with pytest.raises(TypeError, match="linen"):
        jol.bn_fold(lambda x: x, v, DIGITS)
    with pytest.raises(TypeError, match="params"):
        jol.bn_fold(model, {"batch_stats": v["batch_stats"]}, DIGITS)
    bad = jax.tree.map(lambda a: a, v)
    bad["batch_stats"]["BatchNorm_0"]["var"] = v["batch_stats"]["BatchNorm_0"]["var"].at[3].set(
        jnp.nan)
    with pytest.raises(ValueError, match="BatchNorm_0.*Conv_0.*nan"):
        jol.bn_fold(model, bad, DIGITS)
    quantized = {**v, "params": jol.quantize(v["params"])}
    with pytest.raises(TypeError, match="params/Conv_0/kernel.*QTensor.*before quantizing"):
        jol.bn_fold(model, quantized, DIGITS)
    int_kernel = jax.tree.map(lambda a: a, v)
    int_kernel["params"]["Conv_0"]["kernel"] = jnp.zeros((3, 3, 1, 16), jnp.int8)
    with pytest.raises(ValueError, match="Conv_0/kernel must be a floating-point"):
        jol.bn_fold(model, int_kernel, DIGITS)


def test_fold_then_quantize_keeps_accuracy():
    data = jol.app.load_digits()
    model = StudentCNN(features=8, hidden=32)
    tx = optax.adam(1e-2)
    init = random_variables(model, data.train.x[:1], zero_scale=False)  # no eager init
    state = jol.train.create_train_state(model, tx, data.train.x, variables=init)
    step = jax.jit(jol.train.make_train_step(model, tx))
    x, y = jnp.asarray(data.train.x[:512]), jnp.asarray(data.train.y[:512])
    for _ in range(30):
        state, _ = step(state, x, y)
    v = {"params": state.params, **state.model_state}

    def accuracy(variables):
        logits = _jit_apply(model)(variables, jnp.asarray(data.test.x))
        return float((np.asarray(logits).argmax(-1) == data.test.y).mean())

    folded = jol.bn_fold(model, v, data.test.x[:1])
    quantized = jol.quantize(folded["params"], bits=8)
    assert any(isinstance(q, jol.QTensor) for q in jax.tree.leaves(
        quantized, is_leaf=lambda q: isinstance(q, jol.QTensor)))
    deq = {**folded, "params": jol.dequantize(quantized)}
    base = accuracy(v)
    assert base > 0.8, base
    assert accuracy(folded) == base
    assert accuracy(deq) >= base - 0.01


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_folded_value_beyond_the_dtype_raises_naming_the_pair(dtype):
    model = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=True)])
    x = jnp.zeros((1, 4))
    v = jax.tree.map(lambda a: jnp.ones_like(a, dtype), model.init(jax.random.PRNGKey(0), x))
    big = float(jnp.finfo(dtype).max) / 8  # finite model; folded kernel ~ 8 * 316 * big
    v["params"]["layers_0"]["kernel"] = jnp.full((4, 3), big, dtype)
    v["params"]["layers_1"]["scale"] = jnp.full((3,), 8, dtype)
    v["batch_stats"]["layers_1"]["var"] = jnp.zeros((3,), dtype)
    name = jnp.dtype(dtype).name
    with pytest.raises(ValueError, match=f"layers_1 into layers_0: folded kernel overflows {name}"):
        jol.bn_fold(model, v, x)
    v["params"]["layers_0"]["kernel"] = jnp.ones((4, 3), dtype)  # now only the bias overflows
    v["params"]["layers_0"]["bias"] = jnp.full((3,), big, dtype)
    with pytest.raises(ValueError, match=f"folded bias overflows {name}"):
        jol.bn_fold(model, v, x)
