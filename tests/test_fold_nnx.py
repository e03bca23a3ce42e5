"""bn_fold_nnx (jaxopt_lab/fold/nnx.py): the NNX path folds exactly, leaves the input alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fold_testing import leaves_equal, nnx_call, random_nnx, rel_err
from flax import nnx

import jaxopt_lab as jol
from jaxopt_lab.app.models import NNXMLP


def _state(module):
    return jax.tree.map(np.array, nnx.state(module))


def test_nnx_mlp_folds_exactly_and_input_is_untouched():
    model = random_nnx(lambda: NNXMLP(din=16, hidden=32, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4, 4)), jnp.float32)
    before = _state(model)
    folded, report = jol.bn_fold_nnx(model, x, return_report=True)
    assert [(p.layer, p.batch_norm, p.shift_in) for p in report.folded] == [
        ("linear1", "bn", "layer_bias")]
    assert leaves_equal(_state(model), before) and model.bn.use_running_average is False
    assert folded.bn.use_running_average is True
    model.eval()
    assert rel_err(nnx_call(folded, x), nnx_call(model, x)) < 1e-5
    assert leaves_equal(_state(jol.bn_fold_nnx(folded, x)), _state(folded))
    lean = jol.bn_fold_nnx(model, x, remove_batchnorms=True)
    assert isinstance(lean.bn, jol.fold.FoldedBatchNorm) and lean.bn.shift is None
    np.testing.assert_allclose(nnx_call(lean, x), nnx_call(folded, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups,use_bias,use_scale,bn_bias", [
    (1, True, True, True), (2, False, True, True), (4, False, False, False),
    (1, False, True, False),
])
def test_nnx_conv_stacks_fold_exactly(groups, use_bias, use_scale, bn_bias):
    def build():
        rngs = nnx.Rngs(1)
        return nnx.Sequential(
            nnx.Conv(4, 8, (3, 3), feature_group_count=groups, use_bias=use_bias, rngs=rngs),
            nnx.BatchNorm(8, use_scale=use_scale, use_bias=bn_bias, rngs=rngs),
            nnx.tanh,
            nnx.ConvTranspose(8, 4, (2, 2), use_bias=use_bias, rngs=rngs),
            nnx.BatchNorm(4, use_scale=use_scale, use_bias=bn_bias, rngs=rngs),
        )

    model = random_nnx(build, seed=groups)
    model.eval()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 5, 4)), jnp.float32)
    folded, report = jol.bn_fold_nnx(model, x, return_report=True)
    assert len(report.folded) == 2 and not report.skipped
    want = nnx_call(model, x)
    assert rel_err(nnx_call(folded, x), want) < 1e-5
    # The skip-BatchNorm runner: stand-ins that only add the shift give the same output.
    lean = jol.bn_fold_nnx(model, x, remove_batchnorms=True)
    kinds = [type(m).__name__ for _, m in nnx.iter_modules(lean)]
    assert kinds.count("FoldedBatchNorm") == 2 and "BatchNorm" not in kinds
    np.testing.assert_allclose(lean(x), folded(x), rtol=1e-6, atol=1e-6)


def test_nnx_unfoldable_batchnorm_is_reported_and_untouched():
    model = random_nnx(lambda: nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(2)), nnx.relu, nnx.BatchNorm(4, rngs=nnx.Rngs(2))))
    folded, report = jol.bn_fold_nnx(model, jnp.ones((2, 3)), return_report=True)
    assert not report.folded and "direct output" in report.skipped[0].reason
    assert leaves_equal(_state(folded), _state(model))


def test_nnx_bad_inputs_raise():
    with pytest.raises(TypeError, match="nnx.Module"):
        jol.bn_fold_nnx({"params": {}}, jnp.ones((1, 3)))
    model = random_nnx(lambda: NNXMLP(din=3, hidden=4, rngs=nnx.Rngs(3)))
    model.bn.var.set_value(jnp.full((4,), -1.0))
    with pytest.raises(ValueError, match="bn into linear1.*positive"):
        jol.bn_fold_nnx(model, jnp.ones((2, 3)))


def test_nnx_folded_value_beyond_the_dtype_raises_naming_the_pair():
    model = nnx.Sequential(nnx.Linear(4, 3, param_dtype=jnp.float16, rngs=nnx.Rngs(0)),
                           nnx.BatchNorm(3, param_dtype=jnp.float16, rngs=nnx.Rngs(0)))
    model.layers[0].kernel.set_value(jnp.full((4, 3), 100, jnp.float16))
    model.layers[1].scale.set_value(jnp.full((3,), 1000, jnp.float16))
    with pytest.raises(ValueError, match="layers/1 into layers/0: folded kernel overflows float16"):
        jol.bn_fold_nnx(model, jnp.zeros((1, 4)))


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_nnx_conv_transpose_folds_with_either_kernel_layout(transpose_kernel):
    model = random_nnx(lambda: nnx.Sequential(
        nnx.ConvTranspose(3, 4, (3, 3), transpose_kernel=transpose_kernel, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(4, rngs=nnx.Rngs(1))))
    model.eval()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 3)), jnp.float32)
    folded, report = jol.bn_fold_nnx(model, x, return_report=True)
    assert [(p.layer, p.batch_norm) for p in report.folded] == [("layers/0", "layers/1")]
    assert rel_err(nnx_call(folded, x), nnx_call(model, x)) < 1e-5


def test_nnx_pairs_are_read_from_the_jaxpr_of_stock_models():
    import _flax_models as F

    class Residual(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.LinearGeneral(4, (2, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(3, rngs=rngs)
            self.lin = nnx.Linear(4, 4, rngs=rngs)
            self.bn2 = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            h = self.lin(x)
            return self.bn(self.up(x)).sum(-2) + (self.bn2(h) + h).sum(-1, keepdims=True)

    module = random_nnx(lambda: Residual(nnx.Rngs(0)))
    x = jnp.ones((2, 4))
    folded, report = jol.bn_fold_nnx(module, x, return_report=True)
    assert [(p.layer, p.batch_norm) for p in report.folded] == [("up", "bn")]
    assert [(s.batch_norm, s.layer) for s in report.skipped] == [("bn2", "lin")]
    assert "used elsewhere" in report.skipped[0].reason
    module.eval()
    assert rel_err(nnx_call(folded, x), nnx_call(module, x)) < 1e-5

    conv, images = F.nnx_convnet(3)
    conv = random_nnx(lambda: F.NnxConvNet(3, nnx.Rngs(0)))
    folded, report = jol.bn_fold_nnx(conv, images, return_report=True)
    assert [p.shift_in for p in report.folded] == ["bn_bias", "bn_bias"]
    assert rel_err(nnx_call(folded, images), nnx_call(conv, images)) < 1e-5


def test_nnx_batchnorm_called_in_training_mode_is_reported():
    class Train(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.lin(x), use_running_average=False)

    model = random_nnx(lambda: Train(nnx.Rngs(2)))
    with pytest.warns(UserWarning, match="training mode"):
        folded, report = jol.bn_fold_nnx(model, jnp.ones((2, 3)), return_report=True)
    assert not report.folded and [s.batch_norm for s in report.skipped] == ["bn"]
    assert leaves_equal(_state(folded), _state(model))
