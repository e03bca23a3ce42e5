"""Bad input across the public API (issue 7): every public function, generated inputs.

Each call gets hypothesis-generated input -- random shapes including empty and scalar
leaves, float16/bfloat16/float32/float64 and integer leaves, zeros, constants, huge, tiny
and subnormal magnitudes, NaN and Inf, mismatched trees, bad settings -- and must either
return a result with the function's documented properties (structure kept, finite where
the inputs were finite, exact counts, error bounds...) or raise ``ValueError``/``TypeError``
with a message; anything else fails (see ``_fuzz.attempt``). Every test runs 200 examples.

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
from hypothesis import event, given, settings
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
# The old mixed strategy (mostly valid settings, float leaves and finite values): still used
# by the LSQ test below.
quant_settings = st.sampled_from(QUANT_SETTINGS[:5] * 3 + QUANT_SETTINGS[5:])
wheres = st.sampled_from((None, None, None) + fz.WHERES[1:])
quant_trees = fz.trees(leaves=fz.arrays(shapes=fz.KERNEL_SHAPES * 2 + fz.OTHER_SHAPES,
                                        dtypes=fz.FLOAT_DTYPES * 3 + fz.INT_DTYPES,
                                        kinds=fz.MOSTLY_FINITE))
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


LSQ_SETTINGS = (
    (dict(bits=8), True),
    (dict(bits=4, granularity="channel"), True),
    (dict(bits=2, signed=False), True),
    (dict(bits=3, granularity="channel", axis=0), True),
    (dict(bits=6), False),
    (dict(granularity="group"), False),
)


@fuzz
@given(tree=quant_trees, case=st.sampled_from(LSQ_SETTINGS[:4] * 3 + LSQ_SETTINGS[4:]),
       where=wheres,
       wrong_steps=st.booleans())
def test_lsq_init_and_fake_quant(tree, case, where, wrong_steps):
    kw, valid = case
    lsq_kw = {k: v for k, v in kw.items() if k in ("bits", "signed")}
    steps, err = attempt(jol.lsq_init, tree, where=where, **kw)
    if err is not None:
        if valid:
            assert fz.names_a_leaf(err, tree), err
        # lsq_fake_quant too, with hand-made unit steps on the float leaves
        ones = jax.tree.map(lambda v: np.ones((1,) * np.ndim(v), np.float32)
                            if fz.is_float(v) else None, tree)
        out, err = attempt(jol.lsq_fake_quant, tree, ones, **lsq_kw)
        if err is None:
            assert jax.tree.structure(out) == jax.tree.structure(tree)
        return
    assert valid, f"lsq_init accepted invalid settings {kw}"
    is_none = lambda v: v is None  # noqa: E731
    assert jax.tree.structure(steps, is_leaf=is_none) == jax.tree.structure(tree, is_leaf=is_none)
    picked = []
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(steps, is_leaf=is_none)):
        if s is None:
            continue
        picked.append((x, s))
        assert s.dtype == jnp.float32 and s.ndim == np.ndim(x)
        assert np.isfinite(np.asarray(s)).all() and (np.asarray(s) > 0).all(), (x, s)
    if wrong_steps:
        _, err = attempt(jol.lsq_fake_quant, tree, {"not": steps}, where=where, **lsq_kw)
        assert err is not None
        return
    out, err = attempt(jol.lsq_fake_quant, tree, steps, where=where, **lsq_kw)
    assert err is None, err
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    qn, qp = jol.quant.lsq_bounds(kw["bits"], kw.get("signed", True))
    for x, s in picked:
        y = jol.lsq_fake_quant(x, s, **lsq_kw)
        assert y.shape == np.shape(x) and y.dtype == fz.canonical_dtype(x.dtype)
        y32 = np.asarray(y, np.float32)
        assert np.isfinite(y32).all(), (x, s, y)
        assert (np.abs(y32) <= max(qn, qp) * np.asarray(s) * (1 + 1e-2)).all()
        fz.checked()


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


@fuzz
@given(data=st.data(), num_bins=st.sampled_from([2, 16, 2048, 2048, 2048, 16, 3, 0, True]),
       momentum=st.sampled_from([0.9, 0.9, 0.0, 0.999, 1.0, -0.1, float("nan")]),
       method=st.sampled_from(["minmax", "ema", "percentile", "mse", "kl"]),
       percentile=st.sampled_from([99.99, 99.99, 100.0, 75.0, 50.0, float("nan")]),
       symmetric=st.booleans())
def test_calibration(data, num_bins, momentum, method, percentile, symmetric):
    state, err = attempt(jol.calibration_init, num_bins=num_bins)
    if err is not None:
        state = jol.calibration_init(num_bins=16)
    batches = data.draw(st.lists(fz.arrays(shapes=fz.KERNEL_SHAPES * 2 + fz.OTHER_SHAPES,
                                           dtypes=fz.FLOAT_DTYPES * 3 + fz.INT_DTYPES[:1],
                                           kinds=fz.MOSTLY_FINITE), min_size=1, max_size=3))
    seen = []
    for x in batches:
        new, err = attempt(jol.calibration_observe, state, x, momentum=momentum)
        if err is None:
            assert 0 <= momentum < 1 and fz.is_float(x) and np.size(x) and fz.all_finite(x)
            state = new
            seen.append(fz.ftz(fz.jax_view(x).astype(np.float32)))  # as XLA computes
    rng, err = attempt(jol.calibration_range, state, method=method, percentile=percentile)
    scale, err2 = attempt(jol.calibration_scale, state, method=method, percentile=percentile,
                          symmetric=symmetric)
    if err is not None:
        assert err2 is not None
        return
    assert seen and method != "kl"
    lo, hi = (float(v) for v in rng)
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
    s, z = scale
    s = np.asarray(s)
    assert s.dtype == np.float32 and np.isfinite(s).all() and (s > 0).all(), s
    assert (z is None) == symmetric
    if z is not None:
        assert np.asarray(z).dtype == np.int8
    fz.checked()


# --- int8 compute ---------------------------------------------------------------------------


@fuzz
@given(x=fz.arrays(shapes=((2, 3), (2, 2, 3), (3,), (), (0, 3)),
                   dtypes=fz.FLOAT_DTYPES + (np.dtype(np.int32),)),
       reduce_axes=st.sampled_from([None, (1,), (-1,), (0, 1), (0,), (5,), ()]))
def test_quantize_activations(x, reduce_axes):
    out, err = attempt(jol.quantize_activations, x, reduce_axes=reduce_axes)
    if err is not None:
        return
    codes, scale = out
    assert codes.dtype == jnp.int8 and codes.shape == np.shape(x)
    xv = fz.jax_view(x).astype(np.float32)
    keep = np.max(np.abs(xv), axis=reduce_axes, keepdims=reduce_axes is not None) \
        if np.size(xv) else None
    if keep is not None:
        assert np.shape(scale) == np.shape(keep)
    if not fz.all_finite(x) or not np.size(xv):
        return
    s = np.asarray(scale, np.float32)
    assert np.isfinite(s).all() and (s > 0).all(), s
    err_max = np.abs(np.asarray(codes, np.float32) * s - xv)
    assert (err_max <= 0.5 * s * (1 + 1e-5) + 1e-45).all()
    fz.checked()


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


@fuzz
@given(seed=st.integers(0, 99), padding=st.sampled_from(["SAME", "VALID", ((1, 0), (0, 1)),
                                                          ((1, 0),)]),
       strides=st.sampled_from([(1, 1), (2, 1), (0, 1)]),
       zero=st.sampled_from([None, 5, "vector"]),
       per_channel=st.booleans(), lhs_dtype=st.sampled_from([np.int8, np.int8, np.uint8]))
def test_int8_conv_general_dilated(seed, padding, strides, zero, per_channel, lhs_dtype):
    lhs = fz.fill((2, 4, 4, 2), lhs_dtype, "normal", seed)
    rhs = fz.fill((2, 2, 2, 3), np.int8, "normal", seed + 1)
    rs = np.linspace(0.5, 1.5, 3).astype(np.float32).reshape(1, 1, 1, 3) if per_channel \
        else np.float32(0.5)
    z = None if zero is None else (np.int8(zero) if zero == 5 else np.ones(2, np.int8))
    dn = ("NHWC", "HWIO", "NHWC")
    got, err = attempt(jol.int8_conv_general_dilated, lhs, rhs, strides, padding,
                       lhs_scale=np.float32(0.25), rhs_scale=rs, lhs_zero_point=z,
                       dimension_numbers=dn)
    if err is not None:
        return
    x = (lhs.astype(np.float64) - (0 if z is None else np.float64(z))) * 0.25
    with jax.enable_x64(True):  # a float64 reference (lax rejects what the int8 op must too)
        ref = jax.lax.conv_general_dilated(x, rhs.astype(np.float64) * rs, strides, padding,
                                           dimension_numbers=dn)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)
    fz.checked()


# --- model-level quantization: calibration passes and quantized_apply ------------------------


@functools.cache
def _quant_model():
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    return model, model.init(jax.random.PRNGKey(0), jnp.ones((3, 5)))


_model_inputs = fz.arrays(shapes=((3, 5), (3, 5), (3, 5), (3, 4), (0, 5), (5,)),
                          dtypes=fz.FLOAT_DTYPES[1:] * 2 + (np.dtype(np.int32),),
                          kinds=fz.MOSTLY_FINITE, as_jax=True)


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


def _model_error_ok(err, x) -> bool:
    """Errors a model-level call may raise: ours, or flax's own for an input the model itself
    rejects (a wrong feature count: ``flax.errors.FlaxError`` passes through unchanged)."""
    import flax.errors

    return isinstance(err, (ValueError, TypeError)) or (
        isinstance(err, flax.errors.FlaxError) and np.shape(x)[-1:] != (5,))


def _attempt_model(fn, x, *args, **kwargs):
    try:
        return attempt(fn, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - judged right below
        assert _model_error_ok(e, x), e
        event(f"{fn.__name__}: {type(e).__name__} (flax)")
        return None, e


@fuzz
@given(x=_model_inputs, case=st.sampled_from(QUANT_SETTINGS[:5] * 2 + QUANT_SETTINGS[5:7]),
       act=st.sampled_from(["dynamic", "static", "bad"]),
       method=st.sampled_from(["minmax", "percentile", "mse", "ema", "bogus"]))
def test_observe_activations_and_quantized_apply(x, case, act, method):
    model, variables = _quant_model()
    stats, err = _attempt_model(jol.observe_activations, x, model, variables, None, x,
                                num_bins=16)
    empty, err_empty = _attempt_model(jol.activation_stats_init, x, model, variables, x,
                                      num_bins=16)
    scales = None
    if err is None:
        assert sorted(stats) == ["layers_0", "layers_2"]
        assert err_empty is None, err_empty
        assert sorted(empty) == sorted(stats) and all(int(s.count) == 0 for s in empty.values())
        assert attempt(jol.activation_scales, empty)[1] is not None  # nothing observed yet
        xv = fz.ftz(fz.jax_view(x).astype(np.float32))
        assert (float(stats["layers_0"].min), float(stats["layers_0"].max)) == (
            float(xv.min()), float(xv.max()))
        scales, err_scales = attempt(jol.activation_scales, stats, method=method)
        assert (err_scales is not None) == (method == "bogus"), err_scales
        for s, z in (scales or {}).values():
            assert np.isfinite(np.asarray(s)).all() and float(s) > 0 and z is None, (s, stats)
    else:
        # activation_scales still runs, on statistics that saw nothing
        assert attempt(jol.activation_scales, {"layers_0": jol.calibration_init()},
                       method=method)[1] is not None
        if isinstance(err, ValueError) and fz.is_float(x) and np.shape(x) == (3, 5):
            # finite input may still overflow inside the model; the error names that layer
            assert not fz.all_finite(x) or "layers_2" in str(err), err
    kw, _ = case
    q, err = attempt(jol.quantize, variables, **kw)
    if err is not None:
        q = variables  # quantized_apply on float variables is model.apply
    y_wo, err = _attempt_model(jol.quantized_apply, x, model, q, x)
    if err is not None:
        return
    ref = model.apply(jol.dequantize(q), x)
    with jol.quant.native.use_native_int8(False):  # XLA's dot on the dequantized weights
        assert fz.same_bits(jol.quantized_apply(model, q, x), ref)
    _assert_weight_only_close(y_wo, ref, jol.dequantize(q)["params"], x)
    if act == "static" and scales is None:
        return
    act_scales = {"dynamic": "dynamic", "static": scales, "bad": {"layers_0": scales}}[act]
    y8, err = _attempt_model(jol.quantized_apply, x, model, q, x, mode="w8a8",
                             act_scales=act_scales)
    int8_layers = kw == dict(bits=8)  # per-channel int8: every Dense runs in int8
    if err is not None:
        assert act == "bad" or not int8_layers, err
        return
    assert act != "bad" or not int8_layers, "w8a8 accepted act_scales missing a layer"
    assert np.shape(y8) == np.shape(y_wo)
    if fz.all_finite(x) and np.isfinite(np.asarray(y_wo, np.float32)).all() and act == "dynamic":
        y8 = np.asarray(y8, np.float64)
        assert np.isfinite(y8).all()
        bound = _w8a8_bound(q, fz.jax_view(x), y_wo)
        assert np.abs(y8 - np.asarray(y_wo, np.float64)).max(initial=0) <= bound, bound
        fz.checked()


@fuzz
@given(batches=st.lists(_model_inputs, max_size=2),
       method=st.sampled_from(["minmax", "percentile", "mse", "bogus"]),
       symmetric=st.booleans(), num_bins=st.sampled_from([16, 16, 16, 3]),
       full=st.integers(0, 11))
def test_calibrate(batches, method, symmetric, num_bins, full):
    model, variables = _quant_model()
    if batches and any(np.shape(b) != np.shape(batches[0]) for b in batches):
        batches = batches[:1]
    # Each valid call compiles a fresh pass (~0.4 s): the full path on about a tenth of the
    # examples (empty batches among them), the others check that no batches are rejected.
    if full:
        batches = []
    x = batches[0] if batches else np.zeros((3, 5))
    scales, err = _attempt_model(jol.calibrate, x, model, variables, batches, method=method,
                                 symmetric=symmetric, num_bins=num_bins)
    if err is not None:
        return
    assert batches and method != "bogus" and num_bins == 16
    assert sorted(scales) == ["layers_0", "layers_2"]
    assert all(fz.all_finite(b) for b in batches), "calibrate accepted NaN/Inf"
    for s, z in scales.values():
        assert (z is None) == symmetric
        assert np.isfinite(np.asarray(s)).all() and float(s) > 0, (s, batches)
    fz.checked()



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
@given(data=st.data(), case=st.sampled_from(_DOT_CASES),
       lhs_dtype=st.sampled_from([np.float32, np.float32, jnp.bfloat16, np.int8]),
       kind=st.sampled_from(["normal", "huge", "wide", "nan"]))
def test_weight_only_dot_general(data, case, lhs_dtype, kind):
    lhs_shape, rhs_shape, dims = case
    (_, rc), _ = dims
    lhs = fz.fill(lhs_shape, lhs_dtype, kind, data.draw(st.integers(0, 99)))
    codes = fz.fill(rhs_shape, np.int8, "normal", 1)
    rs = data.draw(_keepdims_scale(rhs_shape, [a % len(rhs_shape) for a in rc]))
    got, err = attempt(jol.weight_only_dot_general, lhs, codes, dims, rhs_scale=rs)
    if err is not None:
        return
    assert np.asarray(got).dtype == lhs.dtype
    weight = (codes.astype(np.float32) * rs).astype(lhs.dtype)  # dequantized, cast to lhs's
    if lhs.dtype == np.float32:
        _assert_within_summation_error(got, lhs, weight, dims)
    fz.checked()


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
