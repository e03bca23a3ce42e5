"""Model choice by input shape, the Dense/BatchNorm network and its resize rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_lab as jol
from jaxopt_lab import train
from jaxopt_lab.report.models import DenseBNNet, as_model_input, models_for, resize


@pytest.mark.parametrize("shape, kind", [
    ((5, 8, 8, 1), "cnn"), ((5, 6, 7, 3), "cnn"), ((5, 16), "dense"), ((5, 1, 9, 1), "dense"),
    ((5, 2, 3, 4, 5), "dense")])
def test_models_for_picks_by_shape(shape, kind):
    pair = models_for(np.zeros(shape, np.float32), 4)
    assert pair.kind == kind
    x = jnp.zeros(shape, jnp.float32)
    for model in (pair.teacher, pair.student):
        variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
        assert model.apply(variables, x, train=False).shape == (5, 4)
    head = pair.teacher.init(jax.random.PRNGKey(0), x[:1], train=False)["params"][pair.teacher_head]
    assert head["kernel"].shape[-1] == 4  # the output layer


def test_as_model_input_adds_a_channel_to_3d_only():
    assert as_model_input(np.zeros((2, 4, 4))).shape == (2, 4, 4, 1)
    assert as_model_input(np.zeros((2, 4))).shape == (2, 4)
    assert as_model_input(np.zeros((2, 4, 4, 3))).shape == (2, 4, 4, 3)


def test_dense_bn_net_folds_and_compacts():
    model = DenseBNNet(hidden=(8, 6), num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    v = model.init(jax.random.PRNGKey(0), x, train=False)
    folded, report = jol.bn_fold(model, v, x, train=False, return_report=True)
    assert len(report.folded) == 2
    np.testing.assert_allclose(model.apply(folded, x), model.apply(v, x), atol=1e-5)
    mask = jol.channel_mask(v["params"], 0.5, where=lambda p, w: "Dense_2" not in str(p))
    small, sv = jol.compact(model, v, mask, x, resize=resize)
    assert small.hidden == (4, 3)
    assert small.apply(sv, x).shape == (4, 3)


def test_resize_refuses_other_models():
    with pytest.raises(TypeError):
        resize(train.MLP(), [3])
