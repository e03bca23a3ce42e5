"""prune/sampled.py: the one-pass sampled select prunes exactly the k lowest scores, ties by
position, the same as a stable sort, whichever of its branches runs (bracket hit, one
entry to cut in the bin, radix fallback on heavy ties or a missed bracket, k = 0)."""

import ast
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_lab.pruning import radix, sampled, select

SHAPES = ((300, 250), (1000,))  # 76000 scores in two arrays: above select.SAMPLED_FROM
TOTAL = sum(int(np.prod(s)) for s in SHAPES)


@functools.cache
def _sampled():
    return jax.jit(lambda a, b, k: sampled.sampled_keep(radix.given_scores([a, b]), k))


@functools.cache
def _sorted():
    return jax.jit(lambda a, b, k: select.sort_keep([a, b], k))


def _scores(kind: str, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for shape in SHAPES:
        if kind == "distinct":
            s = rng.integers(1, 2**30, shape)
        elif kind == "ties":  # a handful of values: the k-th score's bin is full of ties
            s = rng.integers(1, 4, shape)
        elif kind == "pruned":  # many already pruned (score 0), the rest spread widely
            s = np.where(rng.random(shape) < 0.6, 0, rng.integers(1, 2**30, shape))
        elif kind == "clustered":  # a narrow cluster plus far outliers: brackets can miss
            s = np.where(rng.random(shape) < 0.999, rng.integers(10**6, 10**6 + 50, shape),
                         rng.integers(1, 2**31 - 1, shape))
        else:  # magnitudes of normal weights, as magnitude_mask scores them
            s = np.asarray(select.magnitude_scores(rng.normal(size=shape).astype(np.float32)))
        out.append(s.astype(np.int32))
    return out


@settings(max_examples=12)
@given(kind=st.sampled_from(["distinct", "ties", "pruned", "clustered", "magnitude"]),
       seed=st.integers(0, 2**16),
       k=st.one_of(st.sampled_from([0, 1, TOTAL - 1, TOTAL]), st.integers(0, TOTAL)))
def test_sampled_keep_equals_a_stable_sort(kind, seed, k):
    a, b = (jnp.asarray(s) for s in _scores(kind, seed))
    got = _sampled()(a, b, jnp.int32(k))
    want = _sorted()(a, b, jnp.int32(k))
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert sum(int((~np.asarray(g)).sum()) for g in got) == k


def test_keep_lowest_routes_large_inputs_through_the_sampled_select():
    a, b = (jnp.asarray(s) for s in _scores("magnitude", 0))
    k = TOTAL // 3
    got = select.keep_above_k_lowest([a, b], k)
    want = _sorted()(a, b, jnp.int32(k))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_no_import_cycle_between_select_and_sampled():
    # pruning.select dispatches to pruning.sampled; sampled builds on pruning.radix only.
    for module in (sampled, __import__("jaxopt_lab.pruning.radix", fromlist=["radix"])):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    for a in n.names} | {n.module or "" for n in ast.walk(tree)
                                         if isinstance(n, ast.ImportFrom)}
        assert "select" not in imported and "jaxopt_lab.pruning.select" not in imported, (
            module.__name__)
