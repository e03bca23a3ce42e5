"""quant/model_calibration.py: every intercepted layer's input is observed, under its module
path; min/max are the exact extremes over all batches; scales follow from them; jit and
pmap (statistics combined over devices) agree with the eager single-device pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(6)(x))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = Block()(x)
        h = Block()(h)
        return nn.Dense(3)(h)


@functools.cache
def _net():
    model = Net()
    return model, model.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))


def _layer_inputs(variables, x):
    """The inputs of the three Dense layers, computed by hand."""
    p = variables["params"]
    h0 = np.asarray(x, np.float64)
    h1 = np.maximum(h0 @ np.asarray(p["Block_0"]["Dense_0"]["kernel"])
                    + np.asarray(p["Block_0"]["Dense_0"]["bias"]), 0)
    h2 = np.maximum(h1 @ np.asarray(p["Block_1"]["Dense_0"]["kernel"])
                    + np.asarray(p["Block_1"]["Dense_0"]["bias"]), 0)
    return {"Block_0/Dense_0": h0, "Block_1/Dense_0": h1, "Dense_0": h2}


batches = st.lists(st.integers(0, 2**16).map(
    lambda s: np.random.default_rng(s).normal(size=(3, 4)).astype(np.float32) * 3),
    min_size=1, max_size=3)


@settings(max_examples=8)
@given(batches)
def test_observed_extremes_are_exact_over_all_batches(xs):
    model, variables = _net()
    stats = None
    for x in xs:
        stats = jol.observe_activations(model, variables, stats, x, num_bins=16)
    assert sorted(stats) == ["Block_0/Dense_0", "Block_1/Dense_0", "Dense_0"]
    want = [_layer_inputs(variables, x) for x in xs]
    for key, state in stats.items():
        lo = min(w[key].min() for w in want)
        hi = max(w[key].max() for w in want)
        np.testing.assert_allclose([float(state.min), float(state.max)], [lo, hi], rtol=1e-5,
                                   atol=1e-6)
        assert int(state.count) == len(xs)
    scales = jol.activation_scales(stats, method="minmax")
    for key, (s, z) in scales.items():
        amax = max(abs(float(stats[key].min)), abs(float(stats[key].max)))
        assert z is None and float(s) == pytest.approx(amax / 127, rel=1e-6)
    # calibrate is the same pass, jitted, followed by activation_scales.
    got = jol.calibrate(model, variables, xs, method="minmax", num_bins=16)
    for key in scales:
        assert float(got[key][0]) == pytest.approx(float(scales[key][0]), rel=1e-6)


def test_stats_init_has_every_layer_and_nothing_observed():
    model, variables = _net()
    empty = jol.activation_stats_init(model, variables, jnp.ones((3, 4)), num_bins=16)
    assert sorted(empty) == ["Block_0/Dense_0", "Block_1/Dense_0", "Dense_0"]
    assert all(int(s.count) == 0 for s in empty.values())
    with pytest.raises(ValueError, match="no batches observed"):
        jol.activation_scales(empty)
    with pytest.raises(ValueError, match="at least one batch"):
        jol.calibrate(model, variables, [])


def test_jit_and_pmap_equal_the_eager_pass():
    model, variables = _net()
    n = min(jax.device_count(), 4)
    x = np.random.default_rng(0).normal(size=(n, 3, 4)).astype(np.float32)
    eager = jol.observe_activations(model, variables, None, x.reshape(-1, 4), num_bins=16)
    jitted = jax.jit(lambda v, x: jol.observe_activations(model, v, None, x, num_bins=16))(
        variables, x.reshape(-1, 4))
    mapped = jax.pmap(lambda x: jol.observe_activations(model, variables, None, x,
                                                        num_bins=16, axis_name="d"),
                      axis_name="d")(x)
    for key in eager:
        for other in (jitted[key], jax.tree.map(lambda a: a[0], mapped[key])):
            np.testing.assert_allclose([float(other.min), float(other.max)],
                                       [float(eager[key].min), float(eager[key].max)],
                                       rtol=1e-6)


def test_nonfinite_activations_are_refused():
    model, variables = _net()
    x = np.full((3, 4), np.nan, np.float32)
    with pytest.raises(ValueError):
        stats = jax.jit(lambda x: jol.observe_activations(model, variables, None, x,
                                                          num_bins=16))(x)
        jol.activation_scales(stats)


def test_the_input_passed_as_stats_gets_a_type_error_saying_where_inputs_go():
    model, variables = _net()
    with pytest.raises(TypeError, match=r"stats must be None.*observe_activations\(model, "):
        jol.observe_activations(model, variables, np.ones((3, 4), np.float32))


def test_calibrate_compiles_once_per_linen_model_and_settings():
    from jaxopt_lab.quant import model_calibration

    cache = model_calibration._cached_observe_step
    cache.cache_clear()
    model, variables = _net()
    xs = [np.random.default_rng(i).normal(size=(3, 4)).astype(np.float32) for i in range(3)]
    first = jol.calibrate(model, variables, xs, num_bins=32)
    again = jol.calibrate(Net(), variables, xs, num_bins=32)  # an equal module: the same step
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert (cache.cache_info().hits, cache.cache_info().misses) == (1, 1)
    jol.calibrate(model, variables, xs, num_bins=64)  # other settings get their own step
    assert cache.cache_info().misses == 2
    # Other variable values, same structure: the same compiled program, their own result.
    other = jol.calibrate(model, jax.tree.map(lambda a: 2 * a, variables), xs, num_bins=32)
    step = cache(model, 0.9, 32, ())
    assert step._cache_size() == 1
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True))
