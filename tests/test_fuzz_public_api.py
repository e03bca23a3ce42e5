"""Bad input across the public API (issue 7): every public function, generated inputs.

Each call gets hypothesis-generated input -- random shapes including empty and scalar
leaves, float16/bfloat16/float32/float64 and integer leaves, zeros, constants, huge, tiny
and subnormal magnitudes, NaN and Inf, mismatched trees, bad settings -- and must either
return a result with the function's documented properties (structure kept, finite where
the inputs were finite, exact counts, error bounds...) or raise ``ValueError``/``TypeError``
with a message; anything else fails (see ``_fuzz.attempt``). Every test runs 200 examples
(``calibrate``'s two, which compile a model pass per call, 30).

Valid and invalid inputs are separate strategies (issue 14): a ``test_<function>`` draws only
valid input -- the nasty valid values included: zeros, subnormals, huge and tiny finite
magnitudes, size-1 axes, float16/bfloat16 where accepted -- so every example reaches its
property checks, and any error fails it; its ``..._rejects_invalid_input`` twin draws only
input invalid by construction (one bad setting, leaf or argument, the rest valid) and checks
that the error names the leaf path or the bad value. The share of examples reaching the
checks is measured by ``benchmarks/fuzz_reach.py`` (``results/fuzz_reach_public_api.json``).

This module covers quantization (quantize, fake_quant, LSQ, calibration, int8 compute, the
model-level passes), save/load and the coverage check; test_fuzz_public_api_prune.py and
test_fuzz_public_api_models.py the rest. Every fault the fuzzing found was fixed and is
pinned by a regression test in the module's own test file; no input is stepped around.
Each fuzz test reports its outcome mix with ``pytest --hypothesis-show-statistics``.

float64: x64 stays disabled (the default); float64 leaves are NumPy arrays that JAX
downcasts to float32 (see ``_fuzz``). ``test_x64_round_trips`` covers real float64 jax
arrays under ``jax.enable_x64``.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile

import _fuzz as fz
import jax
import jax.numpy as jnp
import numpy as np
from _fuzz import attempt
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol

fuzz = settings(max_examples=fz.EXAMPLES)
is_qtensor = jol.quant.is_qtensor


# --- quantize / dequantize / tree_nbytes -------------------------------------------------

# (settings, valid): valid settings raise only for a bad leaf; invalid ones always raise.
QUANT_SETTINGS = (
    (dict(bits=8), True),
    (dict(bits=4, granularity="group", group_size=2, symmetric=False), True),
    (dict(bits=2, granularity="tensor"), True),
    (dict(bits=3, symmetric=False, axis=0), True),
    (dict(bits=8, granularity="tensor", dtype="float8_e4m3fn"), True),
    (dict(bits=5), False),
    (dict(bits=True), False),
    (dict(granularity="row"), False),
    (dict(granularity="group", group_size=0), False),
    (dict(axis=1.5), False),
    (dict(symmetric="yes"), False),
    (dict(dtype="float8_e4m3fn", symmetric=False), False),
    (dict(scale_dtype="float16"), False),
)
VALID_QUANT = tuple(kw for kw, valid in QUANT_SETTINGS if valid)
INVALID_QUANT = tuple(kw for kw, valid in QUANT_SETTINGS if not valid)
# Valid by construction: finite float kernels with even axes, unselected leaves of every
# kind around them, settings that take any such kernel, and a `where` picking kernels only.
valid_quant = st.sampled_from(VALID_QUANT)
kernel_wheres = st.sampled_from((None, fz.where_kernels_named))


@st.composite
def invalid_quant_calls(draw):
    """``(tree, settings, where, bad path)``: invalid settings (any tree), or valid settings
    with a kernel no setting can take (NaN/Inf or empty) at ``fz.BAD_PATH``."""
    if draw(st.booleans()):
        return draw(fz.kernel_trees()), draw(st.sampled_from(INVALID_QUANT)), \
            draw(kernel_wheres), None
    return draw(fz.trees_with_a_bad_kernel()), draw(valid_quant), draw(kernel_wheres), \
        fz.BAD_PATH


def _qt_error_bound(qt: jol.QTensor) -> float:
    """Largest |x - dequantize(quantize(x))| the numerics allow, over the whole tensor."""
    s = float(np.max(np.asarray(qt.scale, np.float32)))
    if qt.fp8 is None:
        return 0.5 * s * (1 + 1e-6)
    # fp8: 3 (e4m3) mantissa bits relative error, plus the subnormal step near zero.
    return float(np.max(np.abs(qt.dequantize(jnp.float32)))) * 2.0**-4 + s * 2.0**-9


def _selected(tree, where) -> list[bool]:
    where = where or (lambda path, leaf: fz.is_float(leaf) and np.ndim(leaf) >= 2)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [bool(where(p, x)) for p, x in flat]


@fuzz
@given(tree=fz.kernel_trees(), kw=valid_quant, where=kernel_wheres)
def test_quantize_dequantize_tree_nbytes(tree, kw, where):
    q = jol.quantize(tree, where=where, **kw)  # valid input: any error fails the test
    assert jax.tree.structure(q, is_leaf=is_qtensor) == jax.tree.structure(tree)
    leaves = jax.tree.leaves(q, is_leaf=is_qtensor)
    assert [is_qtensor(y) for y in leaves] == _selected(tree, where)
    for x, y in zip(jax.tree.leaves(tree), leaves):
        if not is_qtensor(y):
            assert y is x
            continue
        assert y.shape == np.shape(x) and y.dtype == fz.canonical_dtype(x.dtype)
        x_hat = np.asarray(y.dequantize(jnp.float32))
        assert np.isfinite(x_hat).all() and np.isfinite(np.asarray(y.scale, np.float32)).all()
        assert (np.asarray(y.scale, np.float32) > 0).all()
        err_max = np.max(np.abs(x_hat - fz.jax_view(x).astype(np.float32)))
        assert err_max <= _qt_error_bound(y), (err_max, _qt_error_bound(y), y)
        back = np.asarray(y.dequantize())
        assert back.dtype == y.dtype
        assert np.isfinite(back.astype(np.float32)).all(), (x, back)
    d = jol.dequantize(q)
    assert jax.tree.structure(d) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(d)):
        assert np.shape(y) == np.shape(x)
    expected = sum(leaf.nbytes if is_qtensor(leaf) else np.asarray(leaf).nbytes
                   for leaf in jax.tree.leaves(q, is_leaf=is_qtensor))
    assert jol.tree_nbytes(q) == expected
    fz.checked()


@fuzz
@given(call=invalid_quant_calls())
def test_quantize_and_fake_quant_reject_invalid_input(call):
    tree, kw, where, bad_path = call
    for fn in (jol.quantize, jol.fake_quant):
        err = fz.raises(fn, tree, where=where, **kw)
        if bad_path is not None:  # the message names the leaf at fault
            assert bad_path in str(err), err


@fuzz
@given(tree=fz.kernel_trees(), kw=valid_quant, where=kernel_wheres)
def test_fake_quant_matches_quantize_and_passes_gradients(tree, kw, where):
    out = jol.fake_quant(tree, where=where, **kw)  # valid input: any error fails the test
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    ref = jol.dequantize(jol.quantize(tree, where=where, **kw))
    picked = _selected(tree, where)
    for x, y, r, sel in zip(jax.tree.leaves(tree), jax.tree.leaves(out), jax.tree.leaves(ref),
                            picked):
        if not sel:
            assert y is x
            continue
        assert np.shape(y) == np.shape(x) and y.dtype == fz.canonical_dtype(x.dtype)
        assert fz.same_bits(y, r), "fake_quant differs from dequantize(quantize(x))"
        assert np.isfinite(np.asarray(y, np.float32)).all(), (x, y)
    # STE with absmax scales: nothing is clipped, so d/dx sum(fake_quant(x)) == 1 everywhere.
    def total(t):
        return sum(jnp.sum(v.astype(jnp.float32)) for v in jax.tree.leaves(
            jol.fake_quant(t, where=where, **kw)) if jnp.issubdtype(v.dtype, jnp.floating))

    float_tree = jax.tree.map(lambda v: jnp.asarray(v) if fz.is_float(v) else None, tree)
    for g in jax.tree.leaves(jax.grad(total)(float_tree)):
        assert np.all(np.asarray(g, np.float32) == 1.0), g
    fz.checked()


VALID_LSQ = (dict(bits=8), dict(bits=4, granularity="channel"), dict(bits=2, signed=False),
             dict(bits=3, granularity="channel", axis=0))
INVALID_LSQ = (dict(bits=6), dict(bits=True), dict(granularity="group"),
               dict(granularity="row"))


def _lsq_leaf_kw(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k in ("bits", "signed")}


@fuzz
@given(tree=fz.kernel_trees(), kw=st.sampled_from(VALID_LSQ), where=kernel_wheres)
def test_lsq_init_and_fake_quant(tree, kw, where):
    steps = jol.lsq_init(tree, where=where, **kw)  # valid input: any error fails the test
    is_none = lambda v: v is None  # noqa: E731
    assert jax.tree.structure(steps, is_leaf=is_none) == jax.tree.structure(tree, is_leaf=is_none)
    out = jol.lsq_fake_quant(tree, steps, where=where, **_lsq_leaf_kw(kw))
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    qn, qp = jol.quant.lsq_bounds(kw["bits"], kw.get("signed", True))
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(steps, is_leaf=is_none),
                 jax.tree.leaves(out), _selected(tree, where))
    for x, s, y, sel in leaves:
        assert (s is not None) == sel
        if s is None:
            assert y is x
            continue
        assert s.dtype == jnp.float32 and s.ndim == np.ndim(x)
        s64 = np.asarray(s, np.float64)
        assert np.isfinite(s64).all() and (s64 > 0).all(), (x, s)
        assert y.shape == np.shape(x) and y.dtype == fz.canonical_dtype(x.dtype)
        y64 = np.asarray(y, np.float32).astype(np.float64)
        assert np.isfinite(y64).all(), (x, s, y)
        x64 = fz.jax_view(x).astype(np.float64)
        # Round trip: y is x clipped to the code range, rounded to a step (s/2), then
        # stored in x's dtype (its relative rounding, and XLA's flushed subnormals).
        x_clip = np.clip(x64, -qn * s64, qp * s64)
        eps = float(jnp.finfo(y.dtype).eps)
        # (near zero: float32's flushed subnormals, and the grid of x's dtype's subnormals)
        tiny = 2 * float(np.finfo(np.float32).tiny) + float(jnp.finfo(y.dtype).smallest_subnormal)
        bound = 0.5 * s64 * (1 + 1e-6) + np.abs(y64) * eps + tiny
        assert (np.abs(y64 - x_clip) <= bound).all(), (x, s, y)
        assert (y64[x64 == 0] == 0).all(), "zero must stay exactly zero"
        assert (np.abs(y64) <= np.maximum(qn, qp) * s64 * (1 + 1e-6) + np.abs(y64) * eps).all()
    fz.checked()


@st.composite
def invalid_lsq_calls(draw):
    """``(tree, settings, where, steps or None, what the message must name)``: invalid
    settings, a kernel no setting can take (NaN/Inf/empty) at ``fz.BAD_PATH``, or steps
    that do not match the tree."""
    fault = draw(st.sampled_from(["settings", "bad_kernel", "steps_tree", "steps_rank"]))
    if fault == "settings":
        kw = draw(st.sampled_from(INVALID_LSQ))
        return draw(fz.kernel_trees()), kw, draw(kernel_wheres), None, None
    if fault == "bad_kernel":
        return (draw(fz.trees_with_a_bad_kernel()), draw(st.sampled_from(VALID_LSQ)),
                draw(kernel_wheres), None, fz.BAD_PATH)
    tree, kw = {"Dense_0": {"kernel": draw(fz.finite_kernels())}}, dict(bits=8)
    steps = jol.lsq_init(tree, **kw)
    if fault == "steps_tree":
        return tree, kw, None, {"not": steps}, None
    # a step of the wrong rank (not made by lsq_init for this leaf)
    return tree, kw, None, {"Dense_0": {"kernel": np.ones((1,), np.float32)}}, \
        "['Dense_0']['kernel']"


@fuzz
@given(call=invalid_lsq_calls())
def test_lsq_rejects_invalid_input(call):
    tree, kw, where, steps, named = call
    if steps is None:  # lsq_init must refuse the settings or the leaf
        err = fz.raises(jol.lsq_init, tree, where=where, **kw)
        for key in ("bits", "granularity"):  # the message names the bad setting
            if key in kw and named is None:
                assert repr(kw[key]) in str(err), err
        if "bits" in kw and named is None:  # lsq_fake_quant refuses bad bits too
            fz.raises(jol.lsq_fake_quant, tree, jax.tree.map(lambda v: None, tree),
                      **_lsq_leaf_kw(kw))
    else:
        err = fz.raises(jol.lsq_fake_quant, tree, steps, where=where, **_lsq_leaf_kw(kw))
    if named is not None:
        assert named in str(err), err


# --- save / load / load_metadata -----------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats() | st.text(max_size=4),
    lambda c: st.lists(c, max_size=3) | st.tuples(c, c)
    | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6)


def _json_equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@st.composite
def _storable_leaves(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:  # a QTensor leaf
        x = fz.fill((4, 4), np.float32, "normal", draw(st.integers(0, 99)))
        return jol.quantize(x, bits=draw(st.sampled_from([2, 3, 4, 8])))
    if kind == 1:  # a SparseTensor leaf
        x = fz.fill((4, 4), np.float32, draw(st.sampled_from(fz.KINDS)), draw(st.integers(0, 99)))
        return jol.to_sparse(x * (np.arange(16).reshape(4, 4) % 3 == 0), always=True)
    if kind == 2:
        return draw(st.sampled_from([1, -2.5, float("nan"), True, "text", None]))
    if kind == 3:
        return np.asarray(draw(st.sampled_from([1 + 2j, 0j])), np.complex64).reshape(1)
    return draw(fz.arrays())


@fuzz
@given(tree=fz.trees(leaves=_storable_leaves()), meta=_json, junk=st.binary(max_size=40),
       bad_leaf=st.sampled_from([None, object(), lambda: 0, {1, 2}]))
def test_save_load_round_trip(tree, meta, junk, bad_leaf):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        _, err = attempt(jol.save, path, tree, metadata={"m": meta})
        assert err is None, err
        loaded, got_meta = jol.load(path, with_metadata=True)
        assert _json_equal(got_meta, {"m": meta}) and _json_equal(jol.load_metadata(path), got_meta)
        assert jax.tree.structure(loaded) == jax.tree.structure(tree)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded)):
            assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array))
            if hasattr(a, "dtype"):
                assert fz.same_bits(a, b), (a, b)
            else:
                assert _json_equal(a, b)
        if bad_leaf is not None:  # not storable: a TypeError naming it, the old file intact
            _, err = attempt(jol.save, path, {"ok": np.ones(2), "bad": bad_leaf})
            assert isinstance(err, TypeError) and "bad" in str(err), err
            assert jax.tree.structure(jol.load(path)) == jax.tree.structure(tree)
        other = os.path.join(d, "junk.bin")
        with open(other, "wb") as f:
            f.write(junk)
        for bad_path in (other, os.path.join(d, "missing.safetensors"), d):
            for fn in (jol.load, jol.load_metadata):
                _, err = attempt(fn, bad_path)
                assert isinstance(err, ValueError) and bad_path in str(err), err
    fz.checked()  # (every example: the round trip and the bad paths above)


# --- activation calibration ---------------------------------------------------------------


# Batches calibration takes: non-empty, floating point, finite (as JAX sees them).
_calibration_batches = fz.arrays(shapes=fz.KERNEL_SHAPES + ((4,), (), (1,)),
                                 dtypes=fz.FLOAT_DTYPES, kinds=fz.FINITE_KINDS).filter(
                                     fz.all_finite)


@fuzz
@given(batches=st.lists(_calibration_batches, min_size=1, max_size=3),
       num_bins=st.sampled_from([2, 4, 16, 2048]),
       momentum=st.sampled_from([0.9, 0.0, 0.5, 0.999]),
       method=st.sampled_from(["minmax", "ema", "percentile", "mse"]),
       percentile=st.sampled_from([99.99, 100.0, 75.0, 50.5]),
       symmetric=st.booleans())
def test_calibration(batches, num_bins, momentum, method, percentile, symmetric):
    state = jol.calibration_init(num_bins=num_bins)  # valid input: any error fails the test
    for x in batches:
        state = jol.calibration_observe(state, x, momentum=momentum)
    seen = [fz.ftz(fz.jax_view(x).astype(np.float32)) for x in batches]  # as XLA computes
    assert int(state.count) == len(batches)
    lo, hi = (float(v) for v in jol.calibration_range(state, method=method,
                                                        percentile=percentile))
    x_min = min(float(v.min()) for v in seen)
    x_max = max(float(v.max()) for v in seen)
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi, (lo, hi)
    if method == "minmax":
        assert (lo, hi) == (x_min, x_max)
    elif method == "mse":
        amax = max(abs(x_min), abs(x_max))
        assert -amax <= lo <= 0 <= hi <= amax
    else:  # (a moving average may round one float32 ulp past the extremes)
        slack = 1e-6 * max(abs(x_min), abs(x_max)) if method == "ema" else 0.0
        assert x_min - slack <= lo and hi <= x_max + slack, (x_min, lo, hi, x_max)
    s, z = jol.calibration_scale(state, method=method, percentile=percentile,
                                 symmetric=symmetric)
    s = np.asarray(s)
    assert s.dtype == np.float32 and np.isfinite(s).all() and (s > 0).all(), s
    assert (z is None) == symmetric
    if z is not None:
        assert np.asarray(z).dtype == np.int8
    if lo == hi == 0:  # all zeros observed: scale 1, never 0 or NaN
        assert float(s) == 1.0
    fz.checked()


@st.composite
def invalid_calibration_calls(draw):
    """``(fault, bad value)``: one bad argument or batch, everything else valid."""
    fault = draw(st.sampled_from(["num_bins", "momentum", "batch", "method", "percentile",
                                  "no_batches"]))
    bad = {
        "num_bins": st.sampled_from([0, 1, 3, 2047, True, 16.0]),
        "momentum": st.sampled_from([1.0, -0.1, float("nan"), 2.0]),
        "batch": st.one_of(
            fz.arrays(shapes=fz.KERNEL_SHAPES + ((4,),), dtypes=fz.FLOAT_DTYPES,
                      kinds=("nan", "inf")),
            fz.arrays(shapes=((0,), (0, 4), (4, 0)), dtypes=fz.FLOAT_DTYPES),
            fz.arrays(shapes=fz.KERNEL_SHAPES, dtypes=fz.INT_DTYPES)),
        "method": st.sampled_from(["kl", "bogus", "MinMax", ""]),
        "percentile": st.sampled_from([50.0, 100.5, 0.0, float("nan"), -1.0]),
        "no_batches": st.none(),
    }[fault]
    return fault, draw(bad)


@fuzz
@given(call=invalid_calibration_calls(), x=_calibration_batches)
def test_calibration_rejects_invalid_input(call, x):
    fault, bad = call
    if fault == "num_bins":
        err = fz.raises(jol.calibration_init, num_bins=bad)
        assert repr(bad) in str(err), err
        return
    state = jol.calibration_init(num_bins=16)
    if fault == "momentum":
        err = fz.raises(jol.calibration_observe, state, x, momentum=bad)
        assert repr(bad) in str(err), err
        return
    if fault == "batch":  # the message uses the name the caller gave the batch
        err = fz.raises(jol.calibration_observe, state, bad, name="layer_7")
        assert "layer_7" in str(err), err
        return
    if fault != "no_batches":
        state = jol.calibration_observe(state, x)
    kw = {"method": bad} if fault == "method" else {"method": "percentile", "percentile": bad}
    if fault == "no_batches":
        kw = {"method": "minmax"}
    for fn in (jol.calibration_range, jol.calibration_scale):
        err = fz.raises(fn, state, **kw)
        assert (repr(bad) if fault != "no_batches" else "no batches") in str(err), err


# --- int8 compute ---------------------------------------------------------------------------


_ACT_SHAPES = ((2, 3), (2, 2, 3), (3,), (), (1, 3), (2, 1))


@st.composite
def _reduce_axes(draw, ndim, valid=True):
    """Axes within (valid) or beyond (not) the rank, as tuples of distinct axes."""
    if not valid:
        return draw(st.sampled_from([(ndim,), (-ndim - 1,), (0, ndim + 2)]))
    if draw(st.integers(0, 3)) == 0:
        return None
    axes = draw(st.lists(st.integers(-ndim, ndim - 1), max_size=ndim, unique_by=lambda a: a % ndim)
                ) if ndim else []
    return tuple(axes)


@fuzz
@given(data=st.data(), x=fz.arrays(shapes=_ACT_SHAPES,
                                   dtypes=fz.FLOAT_DTYPES + (np.dtype(np.int32),),
                                   kinds=fz.FINITE_KINDS * 2 + ("nan", "inf")))
def test_quantize_activations(data, x):
    reduce_axes = data.draw(_reduce_axes(np.ndim(x)))
    codes, scale = jol.quantize_activations(x, reduce_axes=reduce_axes)  # valid: no error
    assert codes.dtype == jnp.int8 and codes.shape == np.shape(x)
    xv = fz.ftz(fz.jax_view(x).astype(np.float32))
    keepdims = reduce_axes is not None
    amax = np.max(np.abs(xv), axis=reduce_axes, keepdims=keepdims)
    s = np.asarray(scale, np.float32)
    assert s.shape == np.shape(amax)
    # NaN/Inf in a slice poison that slice's scale (documented); the other slices are exact.
    finite = np.isfinite(amax)
    assert not np.isfinite(s[~finite]).any(), (x, s)
    sb = np.broadcast_to(s, xv.shape)
    ok = np.broadcast_to(finite, xv.shape)
    assert np.isfinite(s[finite]).all() and (s[finite] > 0).all(), s
    c = np.asarray(codes, np.float32)
    assert (np.abs(c) <= 127).all()
    err = np.abs(c.astype(np.float64) * sb - xv)
    assert (err <= 0.5 * sb * (1 + 1e-5) + 1e-45)[ok].all(), (x, codes, s)
    assert (c[ok & (xv == 0)] == 0).all(), "zero must give code 0"
    fz.checked()


@fuzz
@given(data=st.data(), x=fz.arrays(shapes=_ACT_SHAPES + ((0, 3), (0,)),
                                   dtypes=fz.FLOAT_DTYPES, kinds=fz.FINITE_KINDS))
def test_quantize_activations_rejects_invalid_input(data, x):
    if np.size(x) == 0:  # nothing to take a per-tensor scale of
        axes = None
    else:
        axes = data.draw(_reduce_axes(np.ndim(x), valid=False))
    err = fz.raises(jol.quantize_activations, x, reduce_axes=axes)
    assert isinstance(err, ValueError), err
    if axes is not None:  # the message names the axis out of range
        assert any(str(a) in str(err) for a in axes), err


_DOT_CASES = (  # (lhs shape, rhs shape, dimension numbers): valid and invalid
    ((2, 3), (3, 4), (((1,), (0,)), ((), ()))),
    ((2, 3), (4, 3), (((1,), (1,)), ((), ()))),
    ((2, 2, 3), (2, 3, 4), (((2,), (1,)), ((0,), (0,)))),
    ((3,), (3, 4), (((0,), (0,)), ((), ()))),
    ((2, 3), (3, 4), (((0,), (0,)), ((), ()))),
    ((2, 3), (3, 4), (((1, 1), (0, 0)), ((), ()))),
)


_VALID_DOT_CASES, _INVALID_DOT_CASES = _DOT_CASES[:4], _DOT_CASES[4:]


@st.composite
def _keepdims_scale(draw, shape, contracted, kinds=("scalar", "keep", "keep", "wrong")):
    kind = draw(st.sampled_from(kinds))
    if kind == "scalar":
        return np.float32(draw(st.sampled_from([0.01, 1.0, 3.0])))
    if kind == "wrong":
        return np.ones(tuple(shape) + (2,), np.float32)
    dims = tuple(1 if i in contracted else d for i, d in enumerate(shape))
    return np.random.default_rng(draw(st.integers(0, 99))).uniform(0.01, 2, dims).astype(
        np.float32)


def _dot_operands(data, case, lhs_dtype, zero, lhs_scale_kinds=("scalar", "keep"),
                  rhs_scale_kinds=("scalar", "keep")):
    lhs_shape, rhs_shape, dims = case
    (lc, rc), _ = dims
    lhs = fz.fill(lhs_shape, lhs_dtype, "normal", data.draw(st.integers(0, 99)))
    rhs = fz.fill(rhs_shape, np.int8, "normal", 1)
    ls = data.draw(_keepdims_scale(lhs_shape, [a % len(lhs_shape) for a in lc], lhs_scale_kinds))
    rs = data.draw(_keepdims_scale(rhs_shape, [a % len(rhs_shape) for a in rc], rhs_scale_kinds))
    z = None if zero is None else (np.int8(3) if zero == 3 else
                                   np.full(np.shape(ls), 2, np.int8) if np.ndim(ls) else None)
    return lhs, rhs, dims, ls, rs, z


@fuzz
@given(data=st.data(), case=st.sampled_from(_VALID_DOT_CASES),
       zero=st.sampled_from([None, None, 3, "keep"]))
def test_int8_dot_general(data, case, zero):
    lhs, rhs, dims, ls, rs, z = _dot_operands(data, case, np.int8, zero)
    got = jol.int8_dot_general(lhs, rhs, dims, lhs_scale=ls, rhs_scale=rs, lhs_zero_point=z)
    with jax.enable_x64(True):  # a float64 reference: float32 would cancel catastrophically
        ref = jax.lax.dot_general(
            (lhs.astype(np.float64) - (0 if z is None else np.asarray(z, np.float64))) * ls,
            rhs.astype(np.float64) * rs, dims)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref), rtol=1e-5,
                               atol=1e-5)
    fz.checked()


@fuzz
@given(data=st.data(), fault=st.sampled_from(["lhs_dtype", "dims", "lhs_scale", "rhs_scale"]),
       zero=st.sampled_from([None, 3]))
def test_int8_dot_general_rejects_invalid_input(data, fault, zero):
    case = data.draw(st.sampled_from(_INVALID_DOT_CASES if fault == "dims"
                                     else _VALID_DOT_CASES))
    lhs_dtype = data.draw(st.sampled_from([np.int32, np.float32])) if fault == "lhs_dtype" \
        else np.int8
    lhs, rhs, dims, ls, rs, z = _dot_operands(
        data, case, lhs_dtype, zero,
        lhs_scale_kinds=("wrong",) if fault == "lhs_scale" else ("scalar", "keep"),
        rhs_scale_kinds=("wrong",) if fault == "rhs_scale" else ("scalar", "keep"))
    fz.raises(jol.int8_dot_general, lhs, rhs, dims, lhs_scale=ls, rhs_scale=rs,
              lhs_zero_point=z)


_VALID_EINSUMS = ("ij,jk->ik", "bij,bjk->bik", "...j,jk->...k", "ij,kj->ik")
_INVALID_EINSUMS = ("ij,jk", "ii,ij->j", "ij,jk->ikk", "ij,jk,kl->il")


def _einsum_operands(spec, seed, scale_kind):
    a_shape = (2, 2, 3) if spec.startswith("bij") else (2, 3)
    b_shape = {"bij,bjk->bik": (2, 3, 4), "ij,kj->ik": (4, 3)}.get(spec, (3, 4))
    lhs = fz.fill(a_shape, np.int8, "normal", seed)
    rhs = fz.fill(b_shape, np.int8, "normal", seed + 1)
    ls = {"scalar": np.float32(0.5), "wrong": np.ones((5,), np.float32)}.get(
        scale_kind, np.full(a_shape[:-1] + (1,), 0.25, np.float32))
    return lhs, rhs, ls


@fuzz
@given(spec=st.sampled_from(_VALID_EINSUMS), seed=st.integers(0, 99),
       scale_kind=st.sampled_from(["scalar", "keep"]))
def test_int8_einsum(spec, seed, scale_kind):
    lhs, rhs, ls = _einsum_operands(spec, seed, scale_kind)
    got = jol.int8_einsum(spec, lhs, rhs, lhs_scale=ls, rhs_scale=np.float32(2))
    ref = np.einsum(spec, lhs.astype(np.float64) * ls, rhs.astype(np.float64) * 2.0)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-5)
    fz.checked()


@fuzz
@given(data=st.data(), seed=st.integers(0, 99), bad_spec=st.booleans())
def test_int8_einsum_rejects_invalid_input(data, seed, bad_spec):
    if bad_spec:  # a spec it does not take, whatever the scales
        spec = data.draw(st.sampled_from(_INVALID_EINSUMS))
        scale_kind = data.draw(st.sampled_from(["scalar", "keep", "wrong"]))
    else:  # a valid spec with a scale of the wrong shape
        spec, scale_kind = data.draw(st.sampled_from(_VALID_EINSUMS)), "wrong"
    lhs, rhs, ls = _einsum_operands(spec, seed, scale_kind)
    fz.raises(jol.int8_einsum, spec, lhs, rhs, lhs_scale=ls, rhs_scale=np.float32(2))


_CONV_DN = ("NHWC", "HWIO", "NHWC")


def _conv_operands(seed, batch, kind, per_channel, per_example):
    lhs = fz.fill((batch, 4, 4, 2), np.int8, kind, seed)
    rhs = fz.fill((2, 2, 2, 3), np.int8, "normal", seed + 1)
    rs = np.linspace(0.5, 1.5, 3).astype(np.float32).reshape(1, 1, 1, 3) if per_channel \
        else np.float32(0.5)
    ls = np.linspace(0.25, 0.5, batch).astype(np.float32).reshape(batch, 1, 1, 1) \
        if per_example else np.float32(0.25)
    return lhs, rhs, ls, rs


@fuzz
@given(seed=st.integers(0, 2**16), batch=st.sampled_from([2, 1]),
       kind=st.sampled_from(["normal", "normal", "huge", "zeros"]),
       padding=st.sampled_from(["SAME", "VALID", ((1, 0), (0, 1)), "SAME_LOWER"]),
       strides=st.sampled_from([(1, 1), (2, 1), (1, 3)]),
       zero=st.sampled_from([None, 5, -128]),
       per_channel=st.booleans(), per_example=st.booleans())
def test_int8_conv_general_dilated(seed, batch, kind, padding, strides, zero, per_channel,
                                   per_example):
    lhs, rhs, ls, rs = _conv_operands(seed, batch, kind, per_channel, per_example)
    z = None if zero is None else np.int8(zero)
    got = jol.int8_conv_general_dilated(lhs, rhs, strides, padding, lhs_scale=ls,
                                        rhs_scale=rs, lhs_zero_point=z,
                                        dimension_numbers=_CONV_DN)  # valid: no error
    # Padding inserts the zero point (the code of a real 0): the reference pads real zeros.
    x = (lhs.astype(np.float64) - (0 if z is None else np.float64(z))) * ls
    with jax.enable_x64(True):  # a float64 reference
        ref = jax.lax.conv_general_dilated(x, rhs.astype(np.float64) * rs, strides, padding,
                                           dimension_numbers=_CONV_DN)
    assert np.asarray(got).dtype == np.float32 and np.shape(got) == np.shape(ref)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)
    fz.checked()


@fuzz
@given(seed=st.integers(0, 2**16),
       fault=st.sampled_from(["padding", "strides", "zero", "lhs_dtype", "rhs_dtype",
                              "rhs_scale", "lhs_scale"]),
       data=st.data())
def test_int8_conv_general_dilated_rejects_invalid_input(seed, fault, data):
    lhs, rhs, ls, rs = _conv_operands(seed, 2, "normal", True, False)
    padding, strides, z = "SAME", (1, 1), None
    named = {"padding": "padding", "strides": "window_strides", "zero": "lhs_zero_point",
             "lhs_dtype": "lhs", "rhs_dtype": "rhs", "rhs_scale": "rhs_scale",
             "lhs_scale": "lhs_scale"}[fault]
    if fault == "padding":
        padding = data.draw(st.sampled_from([((1, 0),), "FULL", ((1, 0), (0, 1), (0, 0)),
                                             ((1.5, 0), (0, 1))]))
    elif fault == "strides":
        strides = data.draw(st.sampled_from([(0, 1), (1,), (1.5, 1), (True, 1), (-1, 1)]))
    elif fault == "zero":
        z = np.ones(data.draw(st.sampled_from([2, 3])), np.int8)
    elif fault == "lhs_dtype":
        lhs = lhs.astype(data.draw(st.sampled_from([np.uint8, np.int32, np.float32])))
    elif fault == "rhs_dtype":
        rhs = rhs.astype(data.draw(st.sampled_from([np.int16, np.float32])))
    elif fault == "rhs_scale":  # varies along the kernel's input-feature axis
        rs = np.ones((1, 1, 2, 3), np.float32)
    else:  # varies along a spatial axis
        ls = np.ones((2, 4, 1, 1), np.float32)
    err = fz.raises(jol.int8_conv_general_dilated, lhs, rhs, strides, padding, lhs_scale=ls,
                    rhs_scale=rs, lhs_zero_point=z, dimension_numbers=_CONV_DN)
    assert named in str(err), err


# --- model-level quantization: calibration passes and quantized_apply ------------------------


@functools.cache
def _quant_model():
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    return model, model.init(jax.random.PRNGKey(0), jnp.ones((3, 5)))


def _w8a8_bound(q, x, y_float) -> float:
    """Worst-case |w8a8 - weight-only| of Dense -> relu -> Dense from the rounding steps."""
    w = jol.dequantize(q)["params"]
    col1 = np.abs(np.asarray(w["layers_0"]["kernel"], np.float64)).sum(0).max()
    col2 = np.abs(np.asarray(w["layers_2"]["kernel"], np.float64)).sum(0).max()
    s_x = np.abs(np.asarray(x, np.float64)).max(initial=0) / 127
    e1 = 0.5 * s_x * col1 * 1.01
    h_max = np.abs(np.asarray(y_float, np.float64)).max(initial=0) / max(col2, 1e-30) + e1
    return float((e1 + 0.5 * (h_max + e1) / 127 * 1.01) * col2 + 1e-6)


def _assert_weight_only_close(y, ref, w, x) -> None:
    """The native weight-only kernel differs from XLA's dot only in summation order (and
    fused multiply-adds): within a few float32 ulps of the magnitudes summed, wherever the
    reference is finite and far from overflow."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert y.shape == ref.shape
    mag = np.abs(np.asarray(x, np.float64))
    with np.errstate(over="ignore", invalid="ignore"):  # inf inputs: excluded below
        for layer in ("layers_0", "layers_2"):  # |Dense(|.|)| bounds every partial sum
            mag = mag @ np.abs(np.asarray(w[layer]["kernel"], np.float64)) + np.abs(
                np.asarray(w[layer]["bias"], np.float64))
    ok = np.isfinite(ref) & (mag < 1e37)
    bound = 64 * np.finfo(np.float32).eps * mag + 1e-35  # + subnormals flushed or not
    assert (np.abs(y - ref) <= bound)[ok].all(), (y, ref, bound)


# Valid model inputs: a batch of 5 features (a size-1 batch and an unbatched vector too), any
# float dtype or int32 (Dense promotes), values that cannot overflow the two Dense layers
# (huge float32 inputs can: that error, naming the layer, is the invalid tests' business).
_MODEL_KINDS = ("normal", "zeros", "constant", "tiny", "subnormal", "neg_zero")
_valid_model_inputs = fz.arrays(shapes=((3, 5), (3, 5), (1, 5), (5,)),
                                dtypes=fz.FLOAT_DTYPES + (np.dtype(np.int32),),
                                kinds=_MODEL_KINDS, as_jax=True)
# quantize settings whose kernels int8 compute can consume (integer, symmetric, per tensor or
# per channel), and the others, with which mode="w8a8" must refuse (nothing to intercept).
_W8A8_QUANT = (dict(bits=8), dict(bits=2, granularity="tensor"))
_NO_W8A8_QUANT = tuple(kw for kw in VALID_QUANT if kw not in _W8A8_QUANT)
_ACT_METHODS = ("minmax", "percentile", "mse", "ema")
_LAYERS = ["layers_0", "layers_2"]


@fuzz
@given(x=_valid_model_inputs, kw=st.sampled_from(VALID_QUANT),
       act=st.sampled_from(["dynamic", "static"]), method=st.sampled_from(_ACT_METHODS))
def test_observe_activations_and_quantized_apply(x, kw, act, method):
    model, variables = _quant_model()
    # valid input: any error fails the test
    stats = jol.observe_activations(model, variables, None, x, num_bins=16)
    empty = jol.activation_stats_init(model, variables, x, num_bins=16)
    assert sorted(stats) == _LAYERS
    assert sorted(empty) == _LAYERS and all(int(s.count) == 0 for s in empty.values())
    xv = fz.ftz(fz.jax_view(x).astype(np.float32))
    assert (float(stats["layers_0"].min), float(stats["layers_0"].max)) == (
        float(xv.min()), float(xv.max()))
    scales = jol.activation_scales(stats, method=method)
    assert sorted(scales) == _LAYERS
    for s, z in scales.values():
        assert np.isfinite(np.asarray(s)).all() and float(s) > 0 and z is None, (s, stats)
    q = jol.quantize(variables, **kw)
    y_wo = jol.quantized_apply(model, q, x)
    ref = model.apply(jol.dequantize(q), x)
    with jol.quant.native.use_native_int8(False):  # XLA's dot on the dequantized weights
        assert fz.same_bits(jol.quantized_apply(model, q, x), ref)
    _assert_weight_only_close(y_wo, ref, jol.dequantize(q)["params"], x)
    if kw in _W8A8_QUANT:
        y8 = jol.quantized_apply(model, q, x, mode="w8a8",
                                 act_scales="dynamic" if act == "dynamic" else scales)
        assert np.shape(y8) == np.shape(y_wo)
        y8 = np.asarray(y8, np.float64)
        assert np.isfinite(y8).all()
        if act == "dynamic":
            bound = _w8a8_bound(q, fz.jax_view(x), y_wo)
            assert np.abs(y8 - np.asarray(y_wo, np.float64)).max(initial=0) <= bound, bound
    fz.checked()


@st.composite
def invalid_model_calls(draw):
    """``(fault, x, detail)``: one thing wrong, the rest valid."""
    fault = draw(st.sampled_from(["nan_input", "empty_input", "features", "method",
                                  "no_batches_observed", "act_scales", "no_int8_layer",
                                  "mode"]))
    x = draw(_valid_model_inputs)
    if fault == "nan_input":
        x = draw(fz.arrays(shapes=((3, 5), (5,)), dtypes=fz.FLOAT_DTYPES,
                           kinds=("nan", "inf"), as_jax=True))
    elif fault == "empty_input":
        x = draw(fz.arrays(shapes=((0, 5),), dtypes=fz.FLOAT_DTYPES, as_jax=True))
    elif fault == "features":
        x = draw(fz.arrays(shapes=((3, 4), (3, 6)), dtypes=fz.FLOAT_DTYPES,
                           kinds=_MODEL_KINDS, as_jax=True))
    detail = {"method": st.sampled_from(["bogus", "kl", ""]),
              "act_scales": st.sampled_from(["missing", "bogus"]),
              "no_int8_layer": st.sampled_from(_NO_W8A8_QUANT + (None,)),
              "mode": st.sampled_from(["int8", "w4a8", "W8A8"])}.get(fault, st.none())
    return fault, x, draw(detail)


@fuzz
@given(call=invalid_model_calls())
def test_observe_activations_and_quantized_apply_reject_invalid_input(call):
    fault, x, detail = call
    model, variables = _quant_model()
    if fault in ("nan_input", "empty_input"):  # the message names the layer that saw it
        err = fz.raises(jol.observe_activations, model, variables, None, x, num_bins=16)
        assert "layers_0" in str(err), err
        return
    if fault == "features":  # flax's own shape check, passed through unchanged
        import flax.errors

        try:
            jol.observe_activations(model, variables, None, x, num_bins=16)
        except flax.errors.ScopeParamShapeError as e:
            assert "layers_0" in str(e), e
            fz.error_checked()
            return
        raise AssertionError("a wrong feature count was accepted")
    stats = jol.observe_activations(model, variables, None, x, num_bins=16)
    if fault == "method":
        err = fz.raises(jol.activation_scales, stats, method=detail)
        assert repr(detail) in str(err), err
        return
    if fault == "no_batches_observed":
        empty = jol.activation_stats_init(model, variables, x, num_bins=16)
        err = fz.raises(jol.activation_scales, empty)
        assert "layers_0" in str(err), err
        return
    if fault == "no_int8_layer":  # w8a8 with nothing int8 compute can consume
        q = variables if detail is None else jol.quantize(variables, **detail)
        err = fz.raises(jol.quantized_apply, model, q, x, mode="w8a8")
        assert "w8a8" in str(err), err
        return
    q = jol.quantize(variables, bits=8)
    if fault == "mode":
        err = fz.raises(jol.quantized_apply, model, q, x, mode=detail)
        assert repr(detail) in str(err), err
        return
    if detail == "missing":  # static scales missing the second layer
        scales = jol.activation_scales(stats)
        err = fz.raises(jol.quantized_apply, model, q, x, mode="w8a8",
                        act_scales={"layers_0": scales["layers_0"]})
        assert "layers_2" in str(err), err
    else:
        err = fz.raises(jol.quantized_apply, model, q, x, mode="w8a8", act_scales="bogus")
        assert "'bogus'" in str(err), err


# Every calibrate call jits a fresh pass over the model (a compile of ~1-3 s on a loaded
# 2-core CPU): 30 examples, each one reaching the property checks (the mixed test this
# replaces ran 200 examples, of which about 30 reached them).
CALIBRATE_EXAMPLES = 30


@settings(max_examples=CALIBRATE_EXAMPLES)
@given(batches=st.lists(_valid_model_inputs, min_size=1, max_size=2),
       method=st.sampled_from(_ACT_METHODS), symmetric=st.booleans(),
       num_bins=st.sampled_from([16, 2, 2048]), momentum=st.sampled_from([0.9, 0.0]))
def test_calibrate(batches, method, symmetric, num_bins, momentum):
    model, variables = _quant_model()
    batches = [b for b in batches if np.shape(b) == np.shape(batches[0])]
    # valid input: any error fails the test
    scales = jol.calibrate(model, variables, batches, method=method, symmetric=symmetric,
                           num_bins=num_bins, momentum=momentum)
    assert sorted(scales) == _LAYERS
    for s, z in scales.values():
        assert (z is None) == symmetric
        assert np.isfinite(np.asarray(s)).all() and float(s) > 0, (s, batches)
    # The first layer sees the batches themselves: its scale is what calibrating them
    # directly gives (the pass is jitted, the reference eager: float32 rounding apart).
    state = jol.calibration_init(num_bins=num_bins)
    for b in batches:
        state = jol.calibration_observe(state, jnp.asarray(b, jnp.float32), momentum=momentum)
    s_ref, z_ref = jol.calibration_scale(state, method=method, symmetric=symmetric)
    s0, z0 = scales["layers_0"]
    np.testing.assert_allclose(np.asarray(s0), np.asarray(s_ref), rtol=1e-6)
    if not symmetric:
        assert int(z0) == int(z_ref), (z0, z_ref)
    fz.checked()


@settings(max_examples=CALIBRATE_EXAMPLES)
@given(fault=st.sampled_from(["no_batches", "num_bins", "momentum", "nan_batch", "method"]),
       x=_valid_model_inputs, data=st.data())
def test_calibrate_rejects_invalid_input(fault, x, data):
    model, variables = _quant_model()
    kw, batches, named = {}, [x], None
    if fault == "no_batches":
        batches, named = [], "batch"
    elif fault == "num_bins":
        kw["num_bins"] = named = data.draw(st.sampled_from([3, 0, 1000]))
    elif fault == "momentum":
        kw["momentum"] = named = data.draw(st.sampled_from([1.0, -0.5]))
    elif fault == "nan_batch":
        batches = [data.draw(fz.arrays(shapes=(np.shape(x),), dtypes=fz.FLOAT_DTYPES,
                                       kinds=("nan", "inf"), as_jax=True))]
        named = "layers_0"
    else:
        kw["method"] = named = data.draw(st.sampled_from(["bogus", "kl"]))
    err = fz.raises(jol.calibrate, model, variables, batches, num_bins=kw.pop("num_bins", 16),
                    **kw)
    assert str(named) in str(err), err


_MATMUL_SHAPES = (((2, 3), (3, 4)), ((2, 3), (3, 4)), ((1, 1), (1, 1)), ((0, 3), (3, 4)),
                  ((2, 0), (0, 4)), ((2, 3), (4, 5)), ((3,), (3, 4)))


_VALID_MATMUL_SHAPES, _INVALID_MATMUL_SHAPES = _MATMUL_SHAPES[:5], _MATMUL_SHAPES[5:]


@fuzz
@given(shapes=st.sampled_from(_VALID_MATMUL_SHAPES), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["normal", "huge", "zeros"]),
       native=st.sampled_from([True, False, 1, 0, None]))
def test_int8_matmul_and_use_native_int8(shapes, seed, kind, native):
    from jaxopt_lab.quant import native as native_mod

    a = fz.fill(shapes[0], np.int8, kind, seed)
    b = fz.fill(shapes[1], np.int8, kind, seed + 1)
    with jol.use_native_int8(native):
        assert native_mod.native_int8_available() == (
            bool(native) and native_mod.native_int8_status() == "ok")
        got = jol.int8_matmul(a, b)  # valid input: any error fails the test
    want = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)  # exact: |sum| < 2**31
    assert np.asarray(got).dtype == np.int32 and np.array_equal(np.asarray(got), want)
    fz.checked()


@fuzz
@given(seed=st.integers(0, 2**16), native=st.booleans(),
       fault=st.sampled_from(["shapes", "lhs_dtype", "rhs_dtype"]))
def test_int8_matmul_rejects_invalid_input(seed, native, fault):
    shapes = (_INVALID_MATMUL_SHAPES if fault == "shapes" else _VALID_MATMUL_SHAPES)[
        seed % (2 if fault == "shapes" else 5)]
    a = fz.fill(shapes[0], np.int32 if fault == "lhs_dtype" else np.int8, "normal", seed)
    b = fz.fill(shapes[1], np.float32 if fault == "rhs_dtype" else np.int8, "normal", seed)
    with jol.use_native_int8(native):
        fz.raises(jol.int8_matmul, a, b)


def _assert_within_summation_error(got, lhs, weight, dims) -> None:
    """``got`` is the float32 contraction of ``lhs`` with ``weight`` up to summation order:
    within a few ulps of the summed magnitudes wherever that sum is finite and far from
    overflow (XLA flushes subnormals, the native kernel may not: 1e-35 absolute)."""
    with jax.enable_x64(True), np.errstate(over="ignore", invalid="ignore"):
        lhs64, w64 = np.asarray(lhs, np.float64), np.asarray(weight, np.float64)
        ref = np.asarray(jax.lax.dot_general(lhs64, w64, dims))
        mag = np.asarray(jax.lax.dot_general(np.abs(lhs64), np.abs(w64), dims))
    ok = np.isfinite(mag) & (mag < 1e37)
    bound = 64 * np.finfo(np.float32).eps * mag + 1e-35
    with np.errstate(invalid="ignore"):  # NaN/Inf entries: excluded by `ok`
        err = np.abs(np.asarray(got, np.float64) - ref)
    assert (err <= bound)[ok].all(), (got, ref)


def _float_int8_operands(shapes, seed, lhs_dtype, rhs_dtype, kind, scale_kind):
    a = fz.fill(shapes[0], lhs_dtype, kind, seed)
    b = fz.fill(shapes[1], rhs_dtype, "normal", seed + 1)
    n = shapes[1][-1]
    scale = (np.ones((n + 1,), np.float32) if scale_kind == "wrong"
             else np.abs(fz.fill((n,), np.float32, scale_kind, seed + 2)) + np.float32(1e-3))
    return a, b, scale


@fuzz
@given(shapes=st.sampled_from(_VALID_MATMUL_SHAPES), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["normal", "huge", "wide", "zeros", "nan", "subnormal"]),
       scale_kind=st.sampled_from(["normal", "normal", "huge"]),
       native=st.sampled_from([True, False]))
def test_float_int8_matmul(shapes, seed, kind, scale_kind, native):
    a, b, scale = _float_int8_operands(shapes, seed, np.float32, np.int8, kind, scale_kind)
    with jol.use_native_int8(native):
        got = jol.float_int8_matmul(a, b, scale)  # valid input: any error fails the test
    n = shapes[1][-1]
    assert np.asarray(got).dtype == np.float32 and np.shape(got) == (a.shape[0], n)
    weight = b.astype(np.float32) * scale  # dequantize's float32 values
    _assert_within_summation_error(got, a, weight, (((1,), (0,)), ((), ())))
    fz.checked()


@fuzz
@given(seed=st.integers(0, 2**16), native=st.booleans(),
       fault=st.sampled_from(["shapes", "lhs_dtype", "rhs_dtype", "scale"]))
def test_float_int8_matmul_rejects_invalid_input(seed, native, fault):
    shapes = (_INVALID_MATMUL_SHAPES if fault == "shapes" else _VALID_MATMUL_SHAPES)[
        seed % (2 if fault == "shapes" else 5)]
    a, b, scale = _float_int8_operands(
        shapes, seed, np.float16 if fault == "lhs_dtype" else np.float32,
        np.int32 if fault == "rhs_dtype" else np.int8, "normal",
        "wrong" if fault == "scale" else "normal")
    with jol.use_native_int8(native):
        fz.raises(jol.float_int8_matmul, a, b, scale)


@fuzz
@given(data=st.data(), case=st.sampled_from(_VALID_DOT_CASES),
       lhs_dtype=st.sampled_from([np.float32, np.float32, jnp.bfloat16, np.float16,
                                  np.float64]),
       kind=st.sampled_from(["normal", "normal", "huge", "wide", "zeros", "subnormal", "nan",
                             "inf"]))
def test_weight_only_dot_general(data, case, lhs_dtype, kind):
    lhs_shape, rhs_shape, dims = case
    (_, rc), _ = dims
    lhs = fz.fill(lhs_shape, lhs_dtype, kind, data.draw(st.integers(0, 2**16)))
    codes = fz.fill(rhs_shape, np.int8, data.draw(st.sampled_from(["normal", "huge", "zeros"])),
                    data.draw(st.integers(0, 2**16)))
    rs = data.draw(_keepdims_scale(rhs_shape, [a % len(rhs_shape) for a in rc],
                                   kinds=("scalar", "keep")))
    got = jol.weight_only_dot_general(lhs, codes, dims, rhs_scale=rs)  # valid: no error
    seen = fz.jax_view(lhs)  # float64 arrives as float32 (x64 off)
    assert np.asarray(got).dtype == seen.dtype
    weight = (codes.astype(np.float32) * rs).astype(seen.dtype)  # dequantized, in lhs's dtype
    if seen.dtype == np.float32:  # the native kernel: XLA's result up to summation order
        _assert_within_summation_error(got, seen, weight, dims)
    else:  # XLA's dot_general on the dequantized weight, bit for bit
        assert fz.same_bits(got, jax.lax.dot_general(jnp.asarray(seen), jnp.asarray(weight),
                                                     dims))
    fz.checked()


@fuzz
@given(data=st.data(), fault=st.sampled_from(["lhs_dtype", "codes_dtype", "dims", "scale"]))
def test_weight_only_dot_general_rejects_invalid_input(data, fault):
    case = data.draw(st.sampled_from(_INVALID_DOT_CASES if fault == "dims"
                                     else _VALID_DOT_CASES))
    lhs_shape, rhs_shape, dims = case
    (_, rc), _ = dims
    lhs_dtype = data.draw(st.sampled_from([np.int8, np.int32, np.uint8, bool])) \
        if fault == "lhs_dtype" else np.float32
    codes_dtype = data.draw(st.sampled_from([np.int32, np.uint8, np.float32])) \
        if fault == "codes_dtype" else np.int8
    lhs = fz.fill(lhs_shape, lhs_dtype, "normal", data.draw(st.integers(0, 99)))
    codes = fz.fill(rhs_shape, codes_dtype, "normal", 1)
    rs = data.draw(_keepdims_scale(rhs_shape, [a % len(rhs_shape) for a in rc],
                                   kinds=("wrong",) if fault == "scale" else ("scalar", "keep")))
    err = fz.raises(jol.weight_only_dot_general, lhs, codes, dims, rhs_scale=rs)
    named = {"lhs_dtype": "lhs", "codes_dtype": "codes", "scale": "rhs_scale"}.get(fault)
    if named is not None:
        assert named in str(err), err


def test_x64_round_trips(tmp_path):
    """With x64 on, float64 jax leaves keep their dtype through quantize/save/load."""
    with jax.enable_x64(True):
        tree = {"k": jnp.asarray(fz.fill((4, 4), np.float64, "wide", 0)),
                "i": jnp.arange(3, dtype=jnp.int64)}
        q = jol.quantize(tree)
        assert q["k"].dtype == jnp.float64 and jol.dequantize(q)["k"].dtype == jnp.float64
        jol.save(tmp_path / "t.safetensors", {"tree": tree, "q": q})
        back = jol.load(tmp_path / "t.safetensors")
        assert fz.same_bits(back["tree"]["k"], tree["k"]) and back["tree"]["i"].dtype == jnp.int64
        assert jol.tree_nbytes(tree) == 4 * 4 * 8 + 3 * 8
        mask = jol.magnitude_mask(tree, 0.5)
        assert int((~mask["k"]).sum()) == 8


# --- coverage: every public function is fuzzed above ------------------------------------

FUZZED = {
    "quantize", "dequantize", "tree_nbytes", "fake_quant", "lsq_init", "lsq_fake_quant",
    "save", "load", "load_metadata", "magnitude_mask", "random_mask", "saliency_mask",
    "nm_mask", "channel_mask", "constant_schedule", "one_shot_schedule", "polynomial_schedule",
    "prune", "apply_mask", "sparsity", "to_sparse", "to_dense", "compact",
    "expand_channel_mask", "distill_loss", "feature_distill_loss", "bn_fold", "bn_fold_nnx",
    "bn_fold_report", "folded_apply", "calibration_init", "calibration_observe",
    "calibration_range", "calibration_scale", "quantize_activations", "int8_dot_general",
    "int8_einsum", "int8_conv_general_dilated", "calibrate", "observe_activations",
    "activation_scales", "quantized_apply", "activation_stats_init", "int8_matmul",
    "use_native_int8", "sweep", "float_int8_matmul", "weight_only_dot_general",
    "model_map",  # tests/test_fuzz_model_map.py
    "weight_only_matmul",  # tests/test_quant_weight_only.py (200 examples per kernel)
    "constant_sparsity", "one_shot_sparsity", "polynomial_sparsity",  # = the old schedules
    "save_sharded", "load_sharded",  # tests/test_io_sharded.py (random trees and layouts)
    "compact_report",  # tests/test_prune_compaction_models.py (random widths and masks)
}


def test_every_public_function_is_fuzzed():
    import inspect

    public = {name for name in jol.__all__ if inspect.isfunction(getattr(jol, name))}
    assert public <= FUZZED, f"public functions without a fuzz test: {sorted(public - FUZZED)}"
    metrics = {f"metrics.{name}" for name in jol.metrics.__all__}
    assert metrics <= {f"metrics.{n}" for n in ("accuracy", "precision", "recall", "f1",
                                                "roc_auc", "mae", "mape", "rmse", "pearson")}
