"""Properties of activation calibration: exact ranges, exact histograms, pmap == one device."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab.quant.calibration import METHODS

NUM_BINS = 256
observe = jax.jit(functools.partial(jol.calibration_observe, momentum=0.5))
scale_fns = {
    (m, sym): jax.jit(functools.partial(jol.calibration_scale, method=m, symmetric=sym,
                                        percentile=99.0))
    for m in METHODS for sym in (True, False)
}
range_fns = {
    (m, sym): jax.jit(functools.partial(jol.calibration_range, method=m, symmetric=sym,
                                        percentile=99.0))
    for m in METHODS for sym in (True, False)
}

finite = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
values = st.one_of(finite, st.sampled_from([0.0, 1e-30, -1e-30, 3.0e30, -7.0]))
batch = hnp.arrays(np.float32, (4, 6), elements=values)  # one shape: one compilation


def observe_all(batches, num_bins=NUM_BINS):
    state = jol.calibration_init(num_bins=num_bins)
    for b in batches:
        state = observe(state, jnp.asarray(b))
    return state


@given(st.lists(batch, min_size=1, max_size=4))
def test_ranges_counts_and_histogram_are_exact(batches):
    state = observe_all(batches)
    flat = np.concatenate([b.ravel() for b in batches])
    assert float(state.min) == flat.min() and float(state.max) == flat.max()
    assert int(state.count) == len(batches)
    assert int(state.histogram.sum()) == flat.size
    r = 2.0 ** int(state.exponent)
    assert np.all(np.abs(flat) < r)
    # Binning every batch on the final range equals binning early and merging later.
    direct = observe(state._replace(histogram=jnp.zeros_like(state.histogram)), jnp.asarray(flat))
    np.testing.assert_array_equal(direct.histogram, state.histogram)


@given(st.lists(batch, min_size=1, max_size=3))
def test_scales_positive_finite_and_ranges_ordered(batches):
    state = observe_all(batches)
    flat = np.concatenate([b.ravel() for b in batches])
    for (method, sym), fn in scale_fns.items():
        scale, zero = fn(state)
        assert np.isfinite(scale) and scale > 0, (method, sym, scale)
        assert (zero is None) == sym
        lo, hi = range_fns[method, sym](state)
        assert lo <= hi
        amax = np.float32(np.abs(flat).max())
        if method == "percentile":
            assert flat.min() <= lo and hi <= flat.max()
        if method == "mse":
            assert -amax <= lo and hi <= amax


@pytest.mark.parametrize("value", [0.0, 2.5, -1e-20])
def test_constant_batches_give_a_positive_scale(value):
    state = observe_all([np.full((3, 4), value, np.float32)] * 2)
    for fn in scale_fns.values():
        scale, _ = fn(state)
        assert np.isfinite(scale) and scale > 0


def test_moving_average_follows_its_recurrence():
    state = observe_all([np.array([-1.0, 2.0]), np.array([-3.0, 4.0]), np.array([0.0, 6.0])])
    # momentum 0.5: first batch sets the average, then ema = (ema + new) / 2.
    np.testing.assert_allclose([state.ema_min, state.ema_max], [-1.0, 4.5])


def test_percentile_clips_an_outlier_and_keeps_the_bulk():
    rng = np.random.default_rng(0)
    bulk = rng.uniform(-1.0, 1.0, 20_000).astype(np.float32)
    state = observe_all([np.append(bulk, np.float32(100.0))], num_bins=2048)
    lo, hi = jol.calibration_range(state, method="percentile", percentile=99.9)
    assert 0.9 < float(hi) < 1.1 and -1.1 < float(lo) < -0.9, (lo, hi)
    p_hi = [float(jol.calibration_range(state, method="percentile", percentile=p)[1])
            for p in (90.0, 99.0, 99.99, 100.0)]
    assert p_hi == sorted(p_hi) and p_hi[-1] == 100.0


def test_mse_clips_gaussian_tails_more_at_fewer_bits():
    x = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)
    state = observe_all([x], num_bins=2048)
    hi4 = float(jol.calibration_range(state, method="mse", bits=4)[1])
    hi8 = float(jol.calibration_range(state, method="mse", bits=8)[1])
    # ACIQ (Banner et al. 2019): the MSE-optimal 4-bit clip of N(0, 1) is about 2.55.
    assert 2.2 < hi4 < 2.9 and hi4 < hi8 <= float(np.abs(x).max()) + 1e-6, (hi4, hi8)


def test_nan_raises_when_concrete_and_propagates_when_traced():
    state = jol.calibration_init(num_bins=NUM_BINS)
    bad = jnp.array([1.0, jnp.nan])
    with pytest.raises(ValueError, match="layer7.*NaN"):
        jol.calibration_observe(state, bad, name="layer7")
    traced = observe(state, bad)
    for fn in scale_fns.values():
        assert np.isnan(fn(traced)[0])


def test_bad_arguments_raise():
    state = jol.calibration_init(num_bins=NUM_BINS)
    for kwargs in ({"num_bins": 3}, {"num_bins": 100}, {"num_bins": True}):
        with pytest.raises(ValueError, match="num_bins"):
            jol.calibration_init(**kwargs)
    with pytest.raises(ValueError, match="empty"):
        jol.calibration_observe(state, jnp.zeros((0, 3)))
    with pytest.raises(TypeError, match="floating"):
        jol.calibration_observe(state, jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="momentum"):
        jol.calibration_observe(state, jnp.ones(3), momentum=1.0)
    with pytest.raises(ValueError, match="no batches"):
        jol.calibration_scale(state)
    state = observe(state, jnp.ones(3))
    with pytest.raises(ValueError, match="method"):
        jol.calibration_range(state, method="kl")
    with pytest.raises(ValueError, match="percentile"):
        jol.calibration_range(state, method="percentile", percentile=30.0)


@settings(max_examples=4)
@given(st.lists(hnp.arrays(np.float32, (8, 3, 5), elements=finite), min_size=1, max_size=3))
def test_pmap_replicas_agree_with_one_device_on_the_global_batch(batches):
    n = jax.local_device_count()
    assert n == 8
    step = jax.pmap(functools.partial(jol.calibration_observe, momentum=0.5, axis_name="d"),
                    axis_name="d", in_axes=(None, 0))
    state = jol.calibration_init(num_bins=NUM_BINS)
    for b in batches:
        state = step(state, jnp.asarray(b))  # every replica sees its (3, 5) shard
        replicas = [jax.tree.map(lambda x, i=i: x[i], state) for i in range(n)]
        for r in replicas[1:]:
            chex.assert_trees_all_equal(r, replicas[0])
        state = replicas[0]
    single = observe_all(batches)
    chex.assert_trees_all_equal(state, single)
    for fn in scale_fns.values():
        chex.assert_trees_all_equal(fn(state), fn(single))


def test_jit_matches_eager():
    batches = [np.linspace(-2, 3, 12, dtype=np.float32), np.linspace(-0.5, 7, 12, dtype=np.float32)]
    eager = jol.calibration_init(num_bins=NUM_BINS)
    for b in batches:
        eager = jol.calibration_observe(eager, jnp.asarray(b), momentum=0.5)
    chex.assert_trees_all_close(eager, observe_all(batches))
    for method, sym in (("percentile", True), ("mse", False)):
        chex.assert_trees_all_close(
            scale_fns[method, sym](eager),
            jol.calibration_scale(eager, method=method, symmetric=sym, percentile=99.0))


def test_huge_activations_scale_exactly_with_a_power_of_two():
    # A half range of 2**128 is inf in float32: percentile edges used to be inf/NaN and mse
    # squared errors overflowed. Both now work in units of the range, so scaling the data by
    # a power of two scales the calibrated range exactly.
    x = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(4, 6) ** 3 * 3.4e38
    x[0, :2] = [0.0, 3e38]
    huge = observe_all([x])
    small = observe_all([x * np.float32(2.0**-64)])
    for (method, sym), fn in range_fns.items():
        lo, hi = (float(v) for v in fn(huge))
        amax = float(np.abs(x).max())
        assert np.isfinite([lo, hi]).all() and lo <= hi, (method, lo, hi)
        if method == "mse":
            assert -amax <= lo <= 0 <= hi <= amax, (method, lo, hi)
        else:
            assert x.min() <= lo and hi <= x.max(), (method, lo, hi)
        assert (lo, hi) == tuple(float(v) * 2.0**64 for v in fn(small)), method
        s, _ = scale_fns[method, sym](huge)
        assert np.isfinite(s) and s > 0
