"""weight_only_matmul: ``x @ dequantize(qt)`` within float32 summation error, native or not.

Each native kernel (GEMV at M = 1 and the dequantizing GEMM above, for int8 and packed
int4 codes) is fuzzed against the float64 product on ``qt.dequantize(float32)``: every tail
of m, n (around the 256-column GEMV and 64-column GEMM panels, odd N leaving a padding
nibble) and k, odd group counts, zero points, scales large enough to need dequantize's
clamp, and NaN/Inf rows.
"""

import re

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.quant import native
from jaxopt_lab.quant.qtensor import QTensor, pack
from jaxopt_lab.quant.weight_only import (
    _as_rows,
    _kernel_matrix,
    conv_patches,
    weight_only_conv,
    weight_only_matmul,
)

EXAMPLES = 200  # per kernel, as issue 16 asks
needs_native = pytest.mark.skipif(not native.native_weight_only_available(),
                                  reason=native.native_weight_only_status())


def make_qtensor(rng, k, n, *, bits, granularity, groups=1, symmetric=True, huge=False,
                 tuple_axes=False):
    """A (k, n) QTensor with random codes, scales and zero points, in storage layout."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = rng.integers(lo, hi, (k, n), endpoint=True)
    if rng.random() < 0.5:  # the extreme codes on whole rows and columns
        codes[:: max(1, k // 3)] = lo
        codes[:, :: max(1, n // 3)] = hi
    shape = {"tensor": (), "channel": (n,), "group": (groups, n)}[granularity]
    scale = rng.uniform(1e-3, 1e-1, shape).astype(np.float32)
    if huge and scale.ndim:  # (q - z) * s beyond float32's range: dequantize clamps
        scale.reshape(-1)[:: 3] = 3e36
    zp = None if symmetric else rng.integers(lo, hi, shape, endpoint=True).astype(np.int8)
    one = (lambda a: (a,)) if tuple_axes else (lambda a: a)
    return QTensor(pack(jnp.asarray(codes, jnp.int8), bits), jnp.asarray(scale),
                   None if zp is None else jnp.asarray(zp), bits=bits, shape=(k, n),
                   dtype=jnp.float32, granularity=granularity,
                   axis=one(1) if granularity == "channel" else None,
                   group_axis=one(0) if granularity == "group" else None,
                   group_size=k // groups if granularity == "group" else None)


def activations(rng, m, k, *, dtype=jnp.float32, nonfinite=False):
    x = rng.standard_normal((m, k)).astype(np.float32)
    if nonfinite and m > 1:
        x[0, rng.integers(k)] = np.nan
        x[1, rng.integers(k)] = np.inf
    elif nonfinite:
        x[0, rng.integers(k)] = rng.choice([np.nan, np.inf, -np.inf])
    return jnp.asarray(x, dtype)


def assert_matches_dequantized_product(y, x, qt):
    """Within float32 summation error of x @ dequantize(qt); NaN and Inf where it has them."""
    w = np.asarray(qt.dequantize(jnp.float32), np.float64)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = x64 @ w
        bound = 2 * x.shape[1] * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w)) + 1e-30
    y = np.asarray(y.astype(jnp.float32), np.float64)
    if x.dtype == jnp.bfloat16:
        bound = bound + np.abs(ref) * 2.0 ** -8  # one rounding to bfloat16
    assert y.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    inf = np.isinf(ref)
    np.testing.assert_array_equal(y[inf], ref[inf])
    finite = np.isfinite(ref)
    err = np.abs(y[finite] - ref[finite])
    assert np.all(err <= bound[finite]), float(np.max(err - bound[finite]))


# (m, k, groups, n) palettes: every tail of the 256-column GEMV panel and of the 64-column
# GEMM panel and 6-row tile, odd and even N (a padding nibble), odd group counts and sizes.
# Few shapes, so the jitted call compiles a few dozen times however many examples run.
GEMV_SHAPES = ((1, 16, 1, 1), (1, 99, 3, 257), (1, 35, 5, 300), (1, 129, 1, 513),
               (1, 40, 5, 256), (1, 7, 7, 31))
GEMM_SHAPES = ((2, 16, 1, 65), (5, 99, 3, 130), (6, 35, 5, 64), (7, 129, 1, 1),
               (13, 40, 5, 257), (3, 7, 7, 33),
               # tall and narrow (a convolution's patches): row chunks, 16/32-column tiles
               (150, 45, 5, 16), (301, 9, 1, 33))
jitted = jax.jit(weight_only_matmul)


def kernel_case(shapes):
    return st.tuples(
        st.sampled_from(shapes),
        st.sampled_from(["tensor", "channel", "group"]),  # tensor/channel: one group
        st.booleans(),                # symmetric
        st.booleans(),                # huge scales
        st.booleans(),                # NaN / Inf rows
        st.integers(0, 2**31 - 1),
    )


def check_kernel(bits, case):
    (m, k, groups, n), granularity, symmetric, huge, nonfinite, seed = case
    rng = np.random.default_rng(seed)
    if granularity != "group":
        groups = 1
    qt = make_qtensor(rng, k, n, bits=bits, granularity=granularity, groups=groups,
                      symmetric=symmetric, huge=huge)
    x = activations(rng, m, k, nonfinite=nonfinite)
    if huge:
        x = x * 1e-4
    assert_matches_dequantized_product(jitted(x, qt), x, qt)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@settings(max_examples=EXAMPLES)
@given(case=kernel_case(GEMV_SHAPES))
def test_gemv_kernel_is_the_dequantized_product(bits, case):
    check_kernel(bits, case)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@settings(max_examples=EXAMPLES)
@given(case=kernel_case(GEMM_SHAPES))
def test_gemm_kernel_is_the_dequantized_product(bits, case):
    check_kernel(bits, case)


@settings(max_examples=20)
@given(st.integers(1, 9), st.sampled_from([4, 8]), st.booleans(), st.integers(0, 2**31 - 1))
def test_native_on_and_off_agree(m, bits, symmetric, seed):
    rng = np.random.default_rng(seed)
    qt = make_qtensor(rng, 96, 70, bits=bits, granularity="group", groups=3,
                      symmetric=symmetric)
    x = activations(rng, m, 96)
    on = weight_only_matmul(x, qt)
    with native.use_native_int8(False):
        off = weight_only_matmul(x, qt)
        jaxpr = str(jax.make_jaxpr(weight_only_matmul)(x, qt))
    assert "ffi_call" not in jaxpr
    assert_matches_dequantized_product(on, x, qt)
    assert_matches_dequantized_product(off, x, qt)


@needs_native
def test_native_path_is_taken_for_its_layouts():
    rng = np.random.default_rng(0)
    x = activations(rng, 1, 64)
    for granularity in ("tensor", "channel", "group"):
        qt = make_qtensor(rng, 64, 33, bits=4, granularity=granularity, groups=2)
        assert "ffi_call" in str(jax.make_jaxpr(weight_only_matmul)(x, qt))


def test_axis_fields_may_be_ints_or_one_tuples():
    rng = np.random.default_rng(0)
    for tuple_axes in (False, True):
        for granularity, rows in (("tensor", 1), ("channel", 1), ("group", 2)):
            qt = make_qtensor(rng, 64, 33, bits=4, granularity=granularity, groups=2,
                              tuple_axes=tuple_axes, symmetric=False)
            scale, zp = _as_rows(qt)
            assert scale.shape == zp.shape == (rows, 33)


def test_other_layouts_fall_back_to_xla_exactly():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((64, 24)), jnp.float32)
    x = activations(rng, 3, 64)
    cases = [jol.quantize(w, bits=2), jol.quantize(w, bits=3),
             jol.quantize(w, bits=4, granularity="group", group_size=8, symmetric=False),
             jol.quantize(w, bits=8, granularity="channel")]
    # One scale per contraction row: not the kernel's layout.
    cases.append(QTensor(jnp.asarray(rng.integers(-127, 128, (64, 24)), jnp.int8),
                         jnp.asarray(rng.uniform(0.01, 0.1, 64), jnp.float32), bits=8,
                         shape=(64, 24), dtype=jnp.float32, granularity="channel", axis=(0,)))
    for qt in cases:
        y = weight_only_matmul(x, qt)
        assert y.shape == (3, 24) and y.dtype == jnp.float32
        assert_matches_dequantized_product(y, x, qt)


def test_bfloat16_activations_and_empty_shapes():
    rng = np.random.default_rng(2)
    qt = make_qtensor(rng, 64, 40, bits=4, granularity="group", groups=2)
    for m in (1, 5):
        x = activations(rng, m, 64, dtype=jnp.bfloat16)
        y = weight_only_matmul(x, qt)
        assert y.dtype == jnp.bfloat16
        assert_matches_dequantized_product(y, x, qt)
    assert weight_only_matmul(jnp.zeros((0, 64)), qt).shape == (0, 40)


def test_bad_inputs_raise_value_errors():
    rng = np.random.default_rng(3)
    qt = make_qtensor(rng, 8, 4, bits=8, granularity="channel")
    with pytest.raises(ValueError, match="QTensor"):
        weight_only_matmul(jnp.ones((1, 8)), jnp.ones((8, 4)))
    with pytest.raises(ValueError, match="K = 8"):
        weight_only_matmul(jnp.ones((1, 7)), qt)
    with pytest.raises(ValueError, match="float"):
        weight_only_matmul(jnp.ones((1, 8), jnp.int32), qt)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), qt)
    with pytest.raises(ValueError, match="2-D"):
        weight_only_matmul(jnp.ones((1, 8)), stacked)


# --- convolutions -------------------------------------------------------------------------

CONV_WINDOWS = ((1, 1, 3), (3, 3, 2), (3, 2, 5), (2, 3, 8))  # kh, kw, input channels
conv_jitted = jax.jit(weight_only_conv, static_argnums=(2, 3))


@settings(max_examples=40)
@given(st.sampled_from(CONV_WINDOWS), st.sampled_from([(1, 1), (2, 2), (2, 1)]),
       st.sampled_from(["SAME", "VALID", ((1, 0), (2, 1)), ((0, -1), (1, 1))]),
       st.sampled_from([4, 8]), st.sampled_from(["tensor", "channel", "group"]),
       st.booleans(), st.sampled_from([1, 16, 33]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_conv_is_the_convolution_of_the_dequantized_kernel(window, strides, padding, bits,
                                                           granularity, symmetric, cout,
                                                           native_on, seed):
    # The patches (exact float32 copies of the padded input) times the kernel matrix: the
    # same float32-summation bound as the matmul, native (windows read in place) or not.
    kh, kw, cin = window
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)), jnp.float32)
    if granularity == "group":
        qt = jol.quantize(w, bits=bits, granularity="group", group_size=cin,
                          symmetric=symmetric, axis=-1)
    else:
        qt = jol.quantize(w, bits=bits, granularity=granularity, symmetric=symmetric)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, cin)), jnp.float32)
    with native.use_native_int8(native_on):
        y = jax.jit(lambda x, q: weight_only_conv(x, q, strides, padding))(x, qt)
    ref = jax.lax.conv_general_dilated(x, qt.dequantize(jnp.float32), strides, padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert y.shape == ref.shape and y.dtype == jnp.float32
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
    xp = jax.lax.pad(x, 0.0, [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)])
    cols, _ = conv_patches(xp, (kh, kw), strides, "VALID")
    mat = _kernel_matrix(qt)
    assert mat is not None
    assert_matches_dequantized_product(y.reshape(-1, cout), cols, mat)


PADS = st.tuples(st.integers(0, 5), st.integers(0, 5))  # up to larger than window - 1


@needs_native
@settings(max_examples=60)
@given(st.sampled_from([(1, 1), (3, 3), (2, 3), (5, 2)]), st.sampled_from([1, 3, 16, 32, 64, 65]),
       st.sampled_from([1, 2, 7]), st.sampled_from([(1, 1), (2, 2), (3, 1)]),
       st.one_of(st.sampled_from(["SAME", "VALID"]), st.tuples(PADS, PADS)),
       st.integers(1, 7), st.integers(1, 7), st.sampled_from([16, 40, 70]),
       st.sampled_from([4, 8]), st.sampled_from(["tensor", "channel"]),
       st.sampled_from([None, np.nan, np.inf, -np.inf]), st.integers(0, 2**31 - 1))
def test_conv_implicit_padding_is_bit_identical_to_padding_first(
        window, cin, batch, strides, padding, h, w, cout, bits, granularity, special, seed):
    # The kernel reads the unpadded input and gathers border windows with their zeros; the
    # reference pads first (lax.pad) and runs the kernel without padding (every window read
    # in place, as before implicit padding). Same FMAs in the same order: the same bits,
    # NaN and Inf inputs included.
    kh, kw = window
    pads = padding
    if isinstance(padding, str):
        pads = tuple(jax.lax.padtype_to_pads((h, w), window, strides, padding))
    hypothesis.assume(h + sum(pads[0]) >= kh and w + sum(pads[1]) >= kw)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h, w, cin)).astype(np.float32)
    if special is not None:
        x.reshape(-1)[rng.integers(0, x.size, 3)] = special
    x = jnp.asarray(x)
    kernel = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)), jnp.float32)
    qt = jol.quantize(kernel, bits=bits, granularity=granularity)
    y = conv_jitted(x, qt, strides, padding)
    xp = jax.lax.pad(x, 0.0, [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
    ref = conv_jitted(xp, qt, strides, ((0, 0), (0, 0)))
    assert y.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(ref).view(np.uint32))
    hlo = conv_jitted.lower(x, qt, strides, padding).compile().as_text()
    assert re.search(r"\bpad\(", hlo) is None  # no padded copy of x is made


@needs_native
def test_conv_runs_the_native_kernel_and_quantized_apply_uses_it():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3))(x))
            x = nn.Conv(8, (3, 3), strides=2, padding="VALID")(x)
            return nn.Dense(4)(x.reshape(x.shape[0], -1))

    model, x = Net(), jnp.linspace(-1.0, 1.0, 2 * 9 * 9 * 3).reshape(2, 9, 9, 3)
    variables = model.init(jax.random.PRNGKey(0), x)
    for bits in (8, 4):
        q = jol.quantize(variables, bits=bits)
        run = lambda q, x: jol.quantized_apply(model, q, x, mode="weight_only")  # noqa: E731
        assert str(jax.make_jaxpr(run)(q, x)).count("jaxopt_lab_weight_only_conv") == 2
        y = jax.jit(run)(q, x)
        ref = model.apply(jol.dequantize(q), x)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_conv_bad_inputs_and_unviewable_scales():
    qt = jol.quantize(jnp.ones((3, 3, 2, 4)), bits=8)
    with pytest.raises(ValueError, match="4-D"):
        weight_only_conv(jnp.ones((1, 5, 5, 2)), jol.quantize(jnp.ones((3, 4)), bits=8),
                         (1, 1), "SAME")
    with pytest.raises(ValueError, match="x must be"):
        weight_only_conv(jnp.ones((1, 5, 5, 3)), qt, (1, 1), "SAME")
    # Scales per input channel have no (K, N) view: XLA's convolution, same values.
    per_in = jol.quantize(jnp.arange(72.0).reshape(3, 3, 2, 4), bits=8, granularity="channel",
                          axis=2)
    x = jnp.ones((1, 5, 5, 2))
    ref = jax.lax.conv_general_dilated(x, per_in.dequantize(jnp.float32), (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(weight_only_conv(x, per_in, (1, 1), "SAME"), ref, rtol=1e-6)
