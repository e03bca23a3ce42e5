"""folded_apply (jaxopt_lab/fold/runner.py): skipping identity BatchNorms changes nothing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fold_testing import random_variables, rel_err

import jaxopt_lab as jol
from jaxopt_lab.app.models import TeacherCNN

X = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)


class ThreeShifts(nn.Module):
    """One pair for each place the shift can live: layer bias, BN bias, BN mean."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=True)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, use_scale=False)(x))
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        return nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False)(x)


@pytest.fixture(scope="module")
def folded_three():
    model = ThreeShifts()
    v = random_variables(model, X, seed=1)
    folded, report = jol.bn_fold(model, v, X, train=False, return_report=True)
    return model, v, folded, report


def test_every_shift_kind_matches_normal_apply(folded_three):
    model, v, folded, report = folded_three
    assert sorted(p.shift_in for p in report.folded) == ["bn_bias", "bn_mean", "layer_bias"]
    want = model.apply(folded, X)
    np.testing.assert_allclose(jol.folded_apply(model, folded, X, report=report), want,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jol.folded_apply(model, folded, X), want, rtol=1e-6, atol=1e-6)
    assert rel_err(want, model.apply(v, X)) < 1e-5


def test_jit_with_report_matches_and_skips_batchnorm_work(folded_three):
    model, _, folded, report = folded_three
    fast = jax.jit(lambda v, x: jol.folded_apply(model, v, x, report=report))
    np.testing.assert_allclose(fast(folded, X), model.apply(folded, X), rtol=1e-6, atol=1e-6)
    # The skipped BatchNorms leave no rsqrt behind; the normal apply has one per BatchNorm.
    count = lambda f: str(jax.make_jaxpr(f)(folded, X)).count("rsqrt")  # noqa: E731
    assert count(lambda v, x: jol.folded_apply(model, v, x, report=report)) == 0
    assert count(lambda v, x: model.apply(v, x)) == 3


def test_teacher_cnn_runner_equals_apply():
    model = TeacherCNN()
    v = random_variables(model, X, seed=2)
    folded, report = jol.bn_fold(model, v, X, return_report=True)
    fast = jax.jit(lambda v, x: jol.folded_apply(model, v, x, report=report, train=False))
    assert rel_err(fast(folded, X), jax.jit(model.apply)(v, X)) < 1e-5


def test_unfolded_variables_are_rejected(folded_three):
    model, v, _, report = folded_three
    with pytest.raises(ValueError, match="BatchNorm_0 is not an identity"):
        jol.folded_apply(model, v, X, report=report)


def test_jit_without_report_is_rejected(folded_three):
    model, _, folded, _ = folded_three
    with pytest.raises(ValueError, match="report="):
        jax.jit(lambda v, x: jol.folded_apply(model, v, x))(folded, X)


def test_training_mode_runs_the_real_batchnorm(folded_three):
    model, _, folded, report = folded_three
    got, got_state = jol.folded_apply(model, folded, X, train=True, report=report,
                                      mutable=["batch_stats"])
    want, want_state = model.apply(folded, X, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got_state, want_state)


def test_nnx_module_is_pointed_to_bn_fold_nnx():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.linear(x))

    block = Block(nnx.Rngs(0))
    with pytest.raises(ValueError, match="bn_fold_nnx"):
        jol.folded_apply(block, nnx.state(block), jnp.ones((2, 3)))
