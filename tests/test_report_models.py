"""Model choice by input shape, the Dense/BatchNorm network and its resize rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab import app
from jaxopt_lab.app.report.models import DenseBNNet, as_model_input, models_for, resize


@pytest.mark.parametrize("shape, kind", [
    ((5, 8, 8, 1), "cnn"), ((5, 6, 7, 3), "cnn"), ((5, 16), "dense"), ((5, 1, 9, 1), "dense"),
    ((5, 2, 3, 4, 5), "dense")])
def test_models_for_picks_by_shape(shape, kind):
    pair = models_for(np.zeros(shape, np.float32), 4)
    assert pair.kind == kind
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    for model in (pair.teacher, pair.student):  # shapes only: nothing is compiled
        variables = jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x), x)
        logits = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, train=False), variables, x)
        assert logits.shape == (5, 4)
        if model is pair.teacher:
            assert variables["params"][pair.teacher_head]["kernel"].shape[-1] == 4


def test_as_model_input_adds_a_channel_to_3d_only():
    assert as_model_input(np.zeros((2, 4, 4))).shape == (2, 4, 4, 1)
    assert as_model_input(np.zeros((2, 4))).shape == (2, 4)
    assert as_model_input(np.zeros((2, 4, 4, 3))).shape == (2, 4, 4, 3)


def test_resize_gives_the_kept_widths():
    # jol.compact calls it; the small run in test_report_job compacts a DenseBNNet for real
    assert resize(DenseBNNet(hidden=(8, 6), num_classes=3), [4, 3]) == DenseBNNet(
        hidden=(4, 3), num_classes=3)


def test_resize_refuses_other_models():
    with pytest.raises(TypeError):
        resize(app.MLP(), [3])
