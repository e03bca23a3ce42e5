"""Which pairs the trace finds (jaxopt_lab/fold/trace.py), through ``bn_fold_report``."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _fold_testing import leaves_equal, random_variables

import jaxopt_lab as jol
from jaxopt_lab.fold.trace import plan_linen

X = jnp.ones((2, 6, 6, 3))


def _report(model, x=X, **kwargs):
    # Only shapes matter for the report: abstract variables avoid a slow eager init.
    v = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.PRNGKey(0), x)
    return jol.bn_fold_report(model, v, x, **kwargs)


def _summary(report):
    return ({(p.layer, p.batch_norm) for p in report.folded},
            {s.batch_norm: s.reason for s in report.skipped})


class Topologies(nn.Module):
    """One module exercising every case the trace must tell apart."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        ura = not train
        a = nn.BatchNorm(use_running_average=ura, name="bn_direct")(
            nn.Conv(4, (3, 3), name="conv_direct")(x))
        b = nn.BatchNorm(use_running_average=ura, name="bn_after_relu")(
            nn.relu(nn.Conv(4, (3, 3), name="conv_relu")(x)))
        c = nn.Conv(4, (3, 3), name="conv_shared_out")(x)
        c = nn.BatchNorm(use_running_average=ura, name="bn_shared_out")(c) + c
        d = nn.BatchNorm(use_running_average=ura, axis=1, name="bn_wrong_axis")(
            nn.Conv(4, (3, 3), name="conv_axis")(x))
        e = nn.BatchNorm(use_running_average=ura, name="bn_of_input")(x[..., :1])
        return a + b + c + d + e


def test_topologies_are_told_apart():
    folded, skipped = _summary(_report(Topologies()))
    assert folded == {("conv_direct", "bn_direct")}
    assert "direct output" in skipped["bn_after_relu"]
    assert "used elsewhere" in skipped["bn_shared_out"]
    assert "feature axes" in skipped["bn_wrong_axis"]
    assert "direct output" in skipped["bn_of_input"]
    assert len(skipped) == 4


def test_training_mode_batchnorms_are_skipped():
    folded, skipped = _summary(_report(Topologies(), train=True))
    assert not folded and all("training mode" in r or "direct output" in r
                              for r in skipped.values())


class SharedConv(nn.Module):
    """One conv called twice: into a BatchNorm once, into nothing the other time."""

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(3, (1, 1), name="conv")
        return nn.BatchNorm(use_running_average=True, name="bn")(conv(x)) + conv(x)


class SharedPair(nn.Module):
    """The same conv -> BN pair applied twice (a weight-tied block): still foldable."""

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(3, (1, 1), name="conv")
        bn = nn.BatchNorm(use_running_average=True, name="bn")
        return bn(conv(bn(conv(x))))


def test_shared_layers():
    folded, skipped = _summary(_report(SharedConv()))
    assert not folded and "called 2 times" in skipped["bn"]
    folded, skipped = _summary(_report(SharedPair()))
    assert folded == {("conv", "bn")} and not skipped


@pytest.mark.parametrize("layer,x,bn_axis,ok", [
    (nn.Dense(5), jnp.ones((2, 3)), -1, True),
    (nn.DenseGeneral((2, 5)), jnp.ones((2, 3)), -1, True),
    (nn.DenseGeneral((2, 5)), jnp.ones((2, 3)), (-2, -1), True),
    (nn.DenseGeneral((2, 5)), jnp.ones((2, 3)), (0, -1), False),
    (nn.Dense(5), jnp.ones((2, 4, 3)), 1, False),
    (nn.ConvTranspose(4, (3, 3), transpose_kernel=True), X, -1, True),
    (nn.Conv(6, (3, 3), feature_group_count=3), X, -1, True),
])
def test_layer_kinds_and_axes(layer, x, bn_axis, ok):
    model = nn.Sequential([layer, nn.BatchNorm(use_running_average=True, axis=bn_axis)])
    folded, skipped = _summary(_report(model, x))
    assert bool(folded) == ok and bool(skipped) == (not ok)


def test_plan_shapes_for_transposed_kernel():
    model = nn.Sequential([nn.ConvTranspose(4, (3, 3), transpose_kernel=True),
                           nn.BatchNorm(use_running_average=True)])
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), X)
    (plan,), _ = plan_linen(model, v, X)
    assert plan.kernel_shape == (3, 3, 4, 3) and plan.kernel_bcast == (4, 1)
    assert plan.bias_bcast == (4,) and plan.stat_shape == (4,)


def test_scanned_layers_are_reported_not_broken():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.BatchNorm(use_running_average=True)(nn.Dense(3)(x)), None

    model = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True}, length=2)()
    x = jnp.ones((2, 3))
    v = random_variables(model, x, None)
    report = jol.bn_fold_report(model, v, x, None)
    assert not report.folded and report.skipped
    assert leaves_equal(jol.bn_fold(model, v, x, None), v)


def test_report_str_lists_everything():
    text = str(_report(Topologies()))
    assert "folded 1" in text and "bn_wrong_axis" in text
