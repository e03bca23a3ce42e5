"""Measurement: exact counts, file sizes, latency figures and ratios."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab.app.models import TeacherCNN
from jaxopt_lab.app.report import measure, variants
from jaxopt_lab.app.report.variants import Variant


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, max_side=6),
                  elements=st.sampled_from([0.0, -0.0, 1.5, -2.0, 1e-30])),
       hnp.arrays(np.float32, st.integers(0, 5), elements=st.sampled_from([0.0, 3.0])))
def test_counts_are_exact(kernel, bias):
    c = measure.counts({"k": kernel, "b": bias})
    assert c["params"] == kernel.size + bias.size
    assert c["nonzero_params"] == int(np.count_nonzero(kernel)) + int(np.count_nonzero(bias))
    assert c["sparsity"] == pytest.approx(1 - np.count_nonzero(kernel) / kernel.size)
    assert c["sparsity"] == pytest.approx(float(jol.sparsity({"k": kernel, "b": bias}).overall))


def test_counts_of_a_tree_without_kernels():
    assert measure.counts({"b": np.zeros(3, np.float32)}) == {
        "params": 3, "nonzero_params": 0, "sparsity": 0.0}


def test_median_seconds_alternates_with_the_baseline_and_the_order():
    calls = []
    a = lambda: calls.append("a") or jnp.ones(2)  # noqa: E731
    b = lambda: calls.append("b") or jnp.ones(2)  # noqa: E731
    t, tb = measure.median_seconds(a, repeats=4, against=b)
    assert t > 0 and tb > 0
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2
    assert measure.median_seconds(a, repeats=2)[1] is None


@given(st.floats(0.0, 1.0), st.integers(1, 10_000))
@example(1.0, 4)  # the upper end rounded to 1 - 1e-16: a negative error bar broke the plot
@example(1.0, 359)  # the full run's test set, where a variant scored 100%
@example(0.0, 10)
def test_wilson_interval_contains_the_estimate(p, n):
    p = round(p * n) / n  # an accuracy measured on n examples
    lo, hi = measure.wilson_interval(p, n)
    assert 0.0 <= lo <= p <= hi <= 1.0  # exactly: the plot's error bars are p - lo, hi - p
    lo2, hi2 = measure.wilson_interval(p, 4 * n)  # more examples, a narrower interval
    assert hi2 - lo2 <= hi - lo + 1e-12


def test_wilson_interval_matches_the_formula():
    # 352 of 359 correct: the Wilson interval worked by hand with z = 1.96.
    lo, hi = measure.wilson_interval(352 / 359, 359)
    assert lo == pytest.approx(0.96030, abs=1e-5) and hi == pytest.approx(0.99052, abs=1e-5)


def _variant(model_scale=1.0):
    def infer(v, x):
        return x.reshape(x.shape[0], -1) @ v["params"]["w"] * model_scale

    stored = {"params": {"w": np.eye(4, 3, dtype=np.float32)}}
    return Variant("toy", "a toy", None, stored, lambda v: v, infer)


class _FakeClock:
    """perf_counter stand-in: each call of a fake inference advances it by a known amount,
    so latency figures are exact and the test does not depend on timing."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def call(self, name, seconds):
        def run():
            self.log.append(name)
            self.now += seconds
            return jnp.ones(2)
        return run


def test_latency_times_variant_against_baseline_with_exact_ratios(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    batches = measure.LATENCY_BATCHES
    # 3 ms and 1 ms per call at batch 1, 30 and 10 at batch 256: a 3x slower variant
    variant = {b: clock.call(f"v{b}", 3e-3 * (1 if b == 1 else 10)) for b in batches}
    base_calls = {b: clock.call(f"b{b}", 1e-3 * (1 if b == 1 else 10)) for b in batches}
    base = {"name": "baseline", **measure.latency(base_calls, repeats=2)}
    clock.log.clear()
    other = {"name": "toy", **measure.latency(variant, repeats=4, baseline=base_calls)}
    # per batch: one warm-up call each, then alternating order (ABBA...), one call at a time
    b = batches[0]
    assert clock.log[:10] == [f"v{b}", f"b{b}", f"v{b}", f"b{b}", f"b{b}", f"v{b}",
                              f"v{b}", f"b{b}", f"b{b}", f"v{b}"]
    for b in batches:
        scale = 1 if b == 1 else 10
        assert other[f"latency_b{b}_ms"] == pytest.approx(3 * scale)
        assert other[f"latency_b{b}_paired_ratio"] == pytest.approx(3.0)
        assert other[f"latency_b{b}_baseline_samples_ms"] == pytest.approx([scale] * 4)
    measure.add_latency_ratios([base, other], base)
    for b in batches:
        scale = 1 if b == 1 else 10
        assert base[f"latency_b{b}_ms"] == pytest.approx(scale)  # pooled: 2 own + 4 paired
        assert base[f"latency_b{b}_ratio"] == 1.0
        assert f"latency_b{b}_baseline_samples_ms" not in other  # pooled into the baseline
        # the ratio is the quotient of the two printed figures
        assert other[f"latency_b{b}_ratio"] == pytest.approx(3.0)
        assert math.isclose(other[f"latency_b{b}_ratio"],
                            other[f"latency_b{b}_ms"] / base[f"latency_b{b}_ms"])


def test_latency_calls_run_the_variant_at_every_batch_size():
    inputs = measure.latency_inputs(np.ones((5, 2, 2), np.float32))
    assert {b: x.shape for b, x in inputs.items()} == {1: (1, 2, 2), 256: (256, 2, 2)}
    variant, doubled = _variant(), _variant(model_scale=2.0)
    calls = measure.latency_calls(variant, variant.stored, inputs)
    other_calls = measure.latency_calls(doubled, doubled.stored, inputs)
    for b, x in inputs.items():
        want = x.reshape(b, -1) @ variant.stored["params"]["w"]
        np.testing.assert_allclose(np.asarray(calls[b]()), want)
        np.testing.assert_allclose(np.asarray(other_calls[b]()), 2 * want)
    base = {"name": "baseline", **measure.latency(calls, repeats=2)}
    other = {"name": "toy", **measure.latency(other_calls, repeats=3, baseline=calls)}
    measure.add_latency_ratios([base, other], base)
    for b in measure.LATENCY_BATCHES:
        assert other[f"latency_b{b}_ms"] > 0 and base[f"latency_b{b}_ms"] > 0
        assert math.isclose(other[f"latency_b{b}_ratio"],
                            other[f"latency_b{b}_ms"] / base[f"latency_b{b}_ms"])


def test_memory_counts_weights_and_xla_temporaries():
    variant = _variant()
    inputs = measure.latency_inputs(np.ones((5, 2, 2), np.float32))
    mem = measure.memory(variant, variant.stored, inputs)
    assert mem["memory_weights_bytes"] == 4 * 3 * 4
    assert mem["memory_all_buffers_visible"] is True
    for b in measure.LATENCY_BATCHES:
        assert mem[f"memory_temp_b{b}_bytes"] >= 0
        assert mem[f"memory_b{b}_bytes"] == 48 + mem[f"memory_temp_b{b}_bytes"]


def test_memory_sees_the_activations_of_a_fused_float_program():
    # XLA's CPU backend hands the float TeacherCNN to YNNPACK as one fusion and reported
    # 640 B of temporaries at batch 256; its second conv's output alone is B x 8 x 8 x 64
    # float32, which must be counted.
    model = TeacherCNN()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    variant = Variant("float", "float TeacherCNN", model, variables, lambda v: v,
                      variants.float_infer(model))
    inputs = measure.latency_inputs(np.ones((3, 8, 8, 1), np.float32))
    mem = measure.memory(variant, variant.stored, inputs)
    assert mem["memory_all_buffers_visible"] is True
    for b in measure.LATENCY_BATCHES:
        assert mem[f"memory_temp_b{b}_bytes"] >= b * 8 * 8 * 64 * 4, (b, mem)


def test_save_and_reload_sizes_the_written_file(tmp_path):
    variant = _variant()
    path, size, loaded = measure.save_and_reload(variant, str(tmp_path), {"seed": 1})
    assert size == (tmp_path / "toy.safetensors").stat().st_size and path.endswith("toy.safetensors")
    np.testing.assert_array_equal(loaded["params"]["w"], variant.stored["params"]["w"])
    assert jol.load_metadata(path) == {"seed": 1}


def test_add_ratios_and_all_finite():
    rows = [{"accuracy": 0.9, "f1_macro": 0.8, "size_bytes": 100},
            {"accuracy": 0.85, "f1_macro": 0.9, "size_bytes": 25}]
    measure.add_ratios(rows, rows[0])
    assert rows[0]["accuracy_delta"] == 0 and rows[0]["size_ratio"] == 1
    assert rows[1]["accuracy_delta"] == pytest.approx(-0.05)
    assert rows[1]["f1_macro_delta"] == pytest.approx(0.1) and rows[1]["size_ratio"] == 0.25
    assert measure.all_finite(rows[1])
    assert not measure.all_finite({"x": float("nan")}) and measure.all_finite({"ok": True})
