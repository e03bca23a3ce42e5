"""Sensitivity sweep: matches per-setting references, budget respected exactly, never
worse than a uniform assignment that fits, and a usable ``where``."""

import doctest
import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.oneshot import (
    Sensitivity,
    as_where,
    hessian_accumulate,
    hessian_init,
    propose,
    sensitivity,
)

SHAPES = {"a": (16, 6), "b": (8, 12), "c": (16, 4)}


def _toy(seed):
    rng = np.random.default_rng(seed)
    ws, stats = {}, {}
    for i, (name, (k, n)) in enumerate(SHAPES.items()):
        x = rng.normal(size=(40, k)) * np.exp(rng.uniform(-1, 1, k)) * (1 + i)
        ws[name] = (rng.normal(size=(k, n)) * np.exp(rng.uniform(-1, 1))).astype(np.float32)
        stats[name] = hessian_accumulate(hessian_init(k), x.astype(np.float32))
    return ws, stats


def _rel(w, v, h):
    d = np.asarray(w, np.float64) - np.asarray(v, np.float64)
    h = np.asarray(h, np.float64)
    return np.sqrt(np.trace(d.T @ h @ d) / np.trace(np.asarray(w, np.float64).T @ h @ w))


@given(st.integers(0, 2**31 - 1))
def test_errors_match_quantize_and_magnitude_mask(seed):
    ws, stats = _toy(seed)
    s = sensitivity(ws, stats, bits=(2, 4, 8), group_size=4)
    for name, w in ws.items():
        for i, b in enumerate((2, 4, 8)):
            v = jol.dequantize(jol.quantize(jnp.asarray(w), bits=b, granularity="group",
                                            group_size=4))
            np.testing.assert_allclose(s.errors[name][i], _rel(w, v, stats[name].xtx),
                                       rtol=2e-3, atol=1e-6)
    p = sensitivity(ws, stats, sparsities=(0.0, 0.5, 0.9))
    for name, w in ws.items():
        for i, sp in enumerate((0.0, 0.5, 0.9)):
            v = jol.apply_mask(jnp.asarray(w), jol.magnitude_mask(jnp.asarray(w), sp))
            np.testing.assert_allclose(p.errors[name][i], _rel(w, v, stats[name].xtx),
                                       rtol=1e-4, atol=1e-6)


@settings(max_examples=20)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_budget_respected_and_never_worse_than_uniform(seed, frac):
    ws, stats = _toy(seed)
    for kw in (dict(bits=(2, 3, 4, 8)), dict(sparsities=(0.0, 0.3, 0.5, 0.7, 0.9))):
        s = sensitivity(ws, stats, **kw)
        lo = sum(c.min() for c in s.costs.values())
        hi = sum(c.max() for c in s.costs.values())
        budget = lo + frac * (hi - lo)
        pick = propose(s, budget)
        idx = {k: s.options.index(v[s.kind]) for k, v in pick.items()}
        cost = sum(s.costs[k][i] for k, i in idx.items())
        err = sum(s.errors[k][i] for k, i in idx.items())
        assert cost <= budget
        for i in range(len(s.options)):
            if sum(c[i] for c in s.costs.values()) <= budget:
                assert err <= sum(e[i] for e in s.errors.values()) + 1e-12


def test_where_mapping_drives_quantize():
    ws, stats = _toy(0)
    s = sensitivity(ws, stats, bits=(4, 8))
    pick = propose(s, sum(c.max() for c in s.costs.values()))
    params = {k: jnp.asarray(w) for k, w in ws.items()}
    named = {f"['{k}']": v for k, v in pick.items()}
    q = jol.quantize(params, where=as_where(named))
    assert {k: q[k].bits for k in ws} == {k: v["bits"] for k, v in pick.items()}


def test_bad_input():
    ws, stats = _toy(0)
    with pytest.raises(ValueError, match="exactly one"):
        sensitivity(ws, stats)
    with pytest.raises(ValueError, match="b: no calibration"):
        sensitivity(ws, {k: v for k, v in stats.items() if k != "b"}, bits=(4,))
    with pytest.raises(ValueError, match="a: group_size=5"):
        sensitivity(ws, stats, bits=(4,), group_size=5)
    with pytest.raises(ValueError, match="sparsities"):
        sensitivity(ws, stats, sparsities=(1.5,))
    s = Sensitivity({"a": np.ones(1)}, {"a": np.array([10.0])}, "bits", (4,))
    with pytest.raises(ValueError, match="budget"):
        propose(s, 5.0)


def test_docstring_examples_run():
    mod = importlib.import_module("jaxopt_lab.oneshot.sensitivity")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0
