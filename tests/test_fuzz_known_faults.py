"""Minimal reproducers of the faults the fuzz tests found (issue 7), one test each.

Each is ``xfail(strict=True)``: it fails today, and turns into an XPASS failure once the fault
is fixed, so whoever fixes it drops the marker (and the predicate in tests/_fuzz_known.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fuzz import attempt

import jaxopt_lab as jol



_known = functools.partial(pytest.mark.xfail, strict=True)


@_known(raises=ZeroDivisionError, reason="channel_mask: selected leaf with 0 channels")
def test_known_channel_mask_empty_leaf():
    assert jol.channel_mask({"w": jnp.zeros((3, 0))}, 0.5)["w"].shape == (3, 0)


@_known(reason="sparsity: XLA flushes subnormal weights, count_nonzero counts them as 0")
def test_known_sparsity_counts_subnormals_as_zero():
    assert float(jol.sparsity({"w": jnp.full((2, 2), 1e-45)}).overall) == 0.0


@_known(reason="lsq_init: mean|v| overflows float32 -> inf step, NaN fake-quant")
def test_known_lsq_init_overflow():
    steps = jol.lsq_init({"w": jnp.full((4, 4), 3e38)})
    assert np.isfinite(np.asarray(steps["w"])).all()


@_known(reason="lsq_fake_quant: rounded-up code * step overflows float16 -> inf")
def test_known_lsq_float16_overflow():
    p = {"w": jnp.full((2, 2), 65504.0, jnp.float16)}
    assert np.isfinite(np.asarray(jol.lsq_fake_quant(p, jol.lsq_init(p), bits=8)["w"],
                                  np.float32)).all()


@_known(reason="quantize: scale >= 2**126 -> x * (1/scale) flushed to 0, all codes 0")
def test_known_quantize_huge_scale():
    x = np.array([[3e38, -3e38], [1e38, 0.0]], np.float32)
    x_hat = jol.dequantize(jol.quantize(x, bits=2, granularity="tensor"))
    assert np.abs(np.asarray(x_hat) - x).max() <= 0.5 * 3e38


@_known(reason="dequantize: float16 level beyond float16 max -> -inf (asymmetric 3-bit)")
def test_known_dequantize_float16_overflow():
    x = np.array([[56320, -61220, -46180, -52220]], np.float16)
    x_hat = jol.dequantize(jol.quantize(x, bits=3, symmetric=False, axis=0))
    assert np.isfinite(np.asarray(x_hat, np.float32)).all()


@_known(reason="distill_loss: T**2 or logits / T overflow float32 -> NaN")
@pytest.mark.parametrize("t, s, temperature", [
    ([[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], 1e20),
    ([[1e36, 0.0]], [[0.0, 1e36]], 1e-3),
])
def test_known_distill_loss_overflow(t, s, temperature):
    assert not np.isnan(float(jol.distill_loss(jnp.asarray(t), jnp.asarray(s),
                                               temperature=temperature)))


@_known(reason="feature_distill_loss(cosine): squared norms overflow -> inf/inf = NaN")
def test_known_cosine_overflow():
    a = jnp.full((2, 3), 1e30)
    assert float(jol.feature_distill_loss(a, a, kind="cosine")) == pytest.approx(0, abs=1e-6)


@_known(reason="bn_fold: folded float16 kernel overflows to inf silently (no ValueError)")
def test_known_bn_fold_float16_overflow():
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=True)])
    x = jnp.zeros((1, 4))
    v = jax.tree.map(lambda a: jnp.ones_like(a, jnp.float16),
                     model.init(jax.random.PRNGKey(0), x))
    v["params"]["layers_0"]["kernel"] = jnp.full((4, 3), 100, jnp.float16)
    v["params"]["layers_1"]["scale"] = jnp.full((3,), 1000, jnp.float16)
    folded, err = attempt(jol.bn_fold, model, v, x)  # original output: [[1, 1, 1]]
    assert err is not None or np.isfinite(np.asarray(model.apply(folded, x))).all()


@_known(reason="calibration percentile: histogram range 2**128 overflows -> NaN")
def test_known_calibration_percentile_huge_values():
    state = jol.calibration_observe(jol.calibration_init(num_bins=16),
                                    jnp.array([3e38, 0.5, 1.0]))
    lo, hi = jol.calibration_range(state, method="percentile")
    assert np.isfinite([float(lo), float(hi)]).all()


@_known(reason="pearson: x / max|x| under jit multiplies by a flushed reciprocal -> NaN")
def test_known_pearson_huge_values():
    x = np.array([1e38, -1e38, 3e38], np.float32)
    assert float(jol.metrics.pearson(x, np.array([1.0, 2.0, 3.0], np.float32))) > 0.9


@_known(reason="mae/mape/rmse: float32 sums of errors overflow though the metric does not")
@pytest.mark.parametrize("name", ["mae", "rmse"])
def test_known_regression_metric_overflow(name):
    y_true = np.array([2e38, 2e38], np.float32) if name == "mae" else np.array([1e30, 0.0])
    y_pred = np.array([-1e38, -1e38], np.float32) if name == "mae" else np.array([-1e30, 0.0])
    assert np.isfinite(float(getattr(jol.metrics, name)(y_true.astype(np.float32),
                                                         y_pred.astype(np.float32))))


@_known(reason="int8_dot_general wraps out-of-range axes (axis % ndim) instead of raising")
def test_known_int8_dot_general_axis_out_of_range():
    lhs, rhs = jnp.ones((2, 3), jnp.int8), jnp.ones((3, 4), jnp.int8)
    with pytest.raises(ValueError):
        jol.int8_dot_general(lhs, rhs, (((5,), (0,)), ((), ())), lhs_scale=1.0, rhs_scale=1.0)


@_known(raises=RuntimeError, reason="int8_conv_general_dilated: bad padding -> RuntimeError")
def test_known_int8_conv_bad_padding():
    with pytest.raises(ValueError):
        jol.int8_conv_general_dilated(
            jnp.ones((1, 4, 4, 1), jnp.int8), jnp.ones((2, 2, 1, 1), jnp.int8), (1, 1),
            "BOGUS", lhs_scale=1.0, rhs_scale=1.0, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@_known(reason="int8_conv_general_dilated + zero point: wrong-length padding accepted")
def test_known_int8_conv_zero_point_padding_length():
    with pytest.raises((ValueError, TypeError)):
        jol.int8_conv_general_dilated(
            jnp.ones((1, 4, 4, 1), jnp.int8), jnp.ones((2, 2, 1, 1), jnp.int8), (1, 1),
            ((1, 0),), lhs_scale=1.0, rhs_scale=1.0, lhs_zero_point=jnp.int8(5),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


@_known(reason="make_dataset(normalize=True): float32 mean/std of huge inputs overflow")
def test_known_make_dataset_normalize_overflow():
    x = np.full((6, 2), 3e38, np.float32) * np.array([[1.0], [-1.0]] * 3, np.float32)
    ds = jol.train.make_dataset(x, np.arange(6) % 2)
    assert np.isfinite(ds.train.x).all()


@_known(raises=AttributeError, reason="sweep: no type check of model/data")
def test_known_sweep_bad_types():
    with pytest.raises(TypeError):
        data = jol.train.make_dataset(np.random.default_rng(0).random((20, 4)),
                                      np.arange(20) % 2)
        jol.sweep("not a model", data, optax.sgd, [0.1], epochs=1, batch_size=4)


@_known(raises=OverflowError, reason="schedules called with a step >= 2**31")
def test_known_schedule_step_beyond_int32():
    with pytest.raises(ValueError):
        jol.polynomial_schedule(0.0, 0.5, 0, 10)(2**31)


@_known(raises=FileNotFoundError, reason="save into a missing directory: OSError, not ValueError")
def test_known_save_missing_directory(tmp_path):
    with pytest.raises(ValueError):
        jol.save(tmp_path / "missing" / "x.safetensors", {"a": np.ones(2)})
