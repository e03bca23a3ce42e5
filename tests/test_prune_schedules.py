"""Sparsity schedules: endpoints, monotonicity, update frequency, jit, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol

fractions = st.floats(0.0, 1.0)


@given(fractions, fractions, st.integers(0, 50), st.integers(1, 200), st.integers(1, 7),
       st.sampled_from([1, 2, 3]))
def test_polynomial_endpoints_and_monotone(s0, s1, begin, length, freq, power):
    end = begin + length
    sched = jol.polynomial_schedule(s0, s1, begin, end, frequency=freq, power=power)
    steps = np.arange(0, 300)  # one shape: eager ops compile once
    vals = np.asarray(sched(jnp.asarray(steps)))
    np.testing.assert_array_equal(vals[steps <= begin], np.float32(s0))
    np.testing.assert_array_equal(vals[steps >= end], np.float32(s1))
    diffs = np.diff(vals) * np.sign(s1 - s0)
    assert (diffs >= 0).all(), "not monotone towards the final sparsity"
    changes = steps[1:][np.diff(vals) != 0]
    assert all((t - begin) % freq == 0 or t == end for t in changes)
    assert ((vals >= min(s0, s1) - 1e-7) & (vals <= max(s0, s1) + 1e-7)).all()


def test_polynomial_matches_zhu_gupta_formula():
    sched = jol.polynomial_schedule(0.1, 0.9, 10, 110)
    for t in (10, 35, 60, 85, 110):
        want = 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3
        assert abs(float(sched(t)) - want) < 1e-6
    assert float(jax.jit(sched)(jnp.int32(60))) == float(sched(60))


def test_constant_and_one_shot():
    assert float(jol.constant_schedule(0.3)(0)) == np.float32(0.3)
    assert float(jax.jit(jol.constant_schedule(0.3))(10**6)) == np.float32(0.3)
    one = jol.one_shot_schedule(0.8, 5)
    assert [float(one(t)) for t in (0, 4)] == [0.0, 0.0]
    assert [float(one(t)) for t in (5, 99)] == [np.float32(0.8)] * 2


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jol.polynomial_schedule(0.0, 0.9, 10, 10), "end_step"),
        (lambda: jol.polynomial_schedule(0.0, 0.9, 10, 5), "end_step"),
        (lambda: jol.polynomial_schedule(-0.1, 0.9, 0, 5), "init_sparsity"),
        (lambda: jol.polynomial_schedule(0.0, 1.1, 0, 5), "final_sparsity"),
        (lambda: jol.polynomial_schedule(0.0, 0.5, 0, 5, frequency=0), "frequency"),
        (lambda: jol.polynomial_schedule(0.0, 0.5, 0, 5, power=0), "power"),
        (lambda: jol.polynomial_schedule(0.0, 0.5, -1, 5), "begin_step"),
        (lambda: jol.constant_schedule(2.0), "sparsity"),
        (lambda: jol.constant_schedule(float("nan")), "sparsity"),
        (lambda: jol.one_shot_schedule(0.5, -3), "step"),
    ],
)
def test_bad_schedules_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError):
        jol.polynomial_schedule(0.0, 0.5, 0.5, 5)
    with pytest.raises(TypeError):
        jol.constant_schedule("0.5")


_SCHEDULES = {
    "constant": jol.constant_schedule(0.6),
    "one_shot": jol.one_shot_schedule(0.6, 2**31 - 1),
    "polynomial": jol.polynomial_schedule(0.1, 0.6, 3, 2**31 - 1, frequency=5),
}


@pytest.mark.parametrize("kind", sorted(_SCHEDULES))
def test_steps_beyond_int32_give_the_final_sparsity(kind):
    """Any non-negative integer step is valid (was OverflowError from 2**31): past int32,
    so past every end_step, the final sparsity; negative concrete steps raise ValueError."""
    sched, final = _SCHEDULES[kind], np.float32(0.6)
    for t in (2**31 - 1, 2**31, 2**40, 2**64 + 5, np.int64(2**33), np.uint64(2**64 - 1)):
        assert np.asarray(sched(t)).dtype == np.float32 and float(sched(t)) == final
    want = np.asarray([float(sched(0)), final, final], np.float32)
    for dtype in (np.int64, np.uint64):  # (constant_schedule gives one scalar for any steps)
        got = sched(np.array([0, 2**31, 2**62], dtype))
        np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (3,)), want)
    for bad in (-1, np.int64(-5), np.array([3, -2])):
        with pytest.raises(ValueError, match="step"):
            sched(bad)
