"""Properties of the int8 x int8 -> int32 ops: they equal float math on dequantized codes."""

import functools
import re

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab.quant.int8_ops import parse_einsum, quantize_with

codes = functools.partial(hnp.arrays, np.int8, elements=st.integers(-127, 127))
pos_scales = functools.partial(hnp.arrays, np.float32,
                               elements=st.sampled_from([2.0 ** -8, 0.01, 0.5, 1.0, 3.0]))
DOT = (((2,), (1,)), ((0,), (0,)))  # (b, m, k) x (b, k, n) -> (b, m, n)


def dequant(q, s, z=None):
    q = q.astype(jnp.float32)
    return (q - (0.0 if z is None else jnp.float32(z))) * s


dot_int8 = jax.jit(jol.int8_dot_general, static_argnums=2)


@given(codes((2, 3, 5)), codes((2, 5, 4)), pos_scales((2, 3, 1)), pos_scales((2, 1, 4)),
       st.sampled_from([None, -128, -3, 0, 17, 127]))
def test_dot_general_equals_float_dot_of_dequantized_codes(ql, qr, sl, sr, z):
    if z is not None:
        ql = np.maximum(ql, -128)
    y = dot_int8(jnp.asarray(ql), jnp.asarray(qr), DOT, lhs_scale=sl, rhs_scale=sr,
                 lhs_zero_point=None if z is None else np.int8(z))
    ref = jax.lax.dot_general(dequant(ql, sl, z), dequant(qr, sr), DOT,
                              precision=jax.lax.Precision.HIGHEST)
    chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("dims, lhs_shape, rhs_shape", [
    ((((1,), (0,)), ((), ())), (4, 6), (6, 3)),          # Dense
    ((((0,), (1,)), ((), ())), (6, 4), (3, 6)),          # transposed operands
    ((((1, 2), (0, 1)), ((), ())), (4, 2, 3), (2, 3, 5)),  # DenseGeneral, two axes
    ((((2,), (1,)), ((1,), (0,))), (4, 3, 6), (3, 6, 2)),  # batch axis in the middle
])
def test_dot_general_layouts_and_per_token_scales(dims, lhs_shape, rhs_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)

    @jax.jit
    def check(x, w):
        (lc, rc), _ = dims
        qx, sx = jol.quantize_activations(x, reduce_axes=lc)
        sw = jnp.max(jnp.abs(w), axis=rc, keepdims=True) / 127
        qw = quantize_with(w, sw)
        y = jol.int8_dot_general(qx, qw, dims, lhs_scale=sx, rhs_scale=sw)
        hi = functools.partial(jax.lax.dot_general, dimension_numbers=dims,
                               precision=jax.lax.Precision.HIGHEST)
        ref = hi(dequant(qx, sx), dequant(qw, sw))
        # Each product is off by at most |x| dw/2 + |w| dx/2 + dx dw/4.
        bound = hi(jnp.abs(x) + sx / 2, jnp.broadcast_to(sw / 2, w.shape)) \
            + hi(jnp.broadcast_to(sx / 2, x.shape), jnp.abs(w))
        return y, ref, jnp.abs(y - hi(x, w)) <= bound * 1.001 + 1e-6

    y, ref, within = check(x, w)
    chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-5)
    assert bool(within.all())


@given(hnp.arrays(np.float32, (3, 8), elements=st.one_of(
    st.floats(-1e6, 1e6, width=32), st.sampled_from([0.0, 1e-30, -1e-30]))))
def test_dynamic_activation_codes_are_within_half_a_step(x):
    q, s = jol.quantize_activations(x, reduce_axes=(1,))
    assert q.dtype == jnp.int8 and s.shape == (3, 1)
    assert bool(jnp.all((s > 0) & jnp.isfinite(s)))
    err = jnp.abs(dequant(q, s) - x)
    assert bool(jnp.all(err <= s / 2 * (1 + 1e-5) + 1e-37))
    np.testing.assert_array_equal(np.asarray(q)[x == 0], 0)


def test_nan_activations_make_the_output_nan_not_a_finite_number():
    x = jnp.array([[1.0, jnp.nan], [0.5, -0.5]])
    q, s = jol.quantize_activations(x, reduce_axes=(1,))
    y = jol.int8_dot_general(q, jnp.ones((2, 3), jnp.int8), (((1,), (0,)), ((), ())),
                             lhs_scale=s, rhs_scale=1.0)
    assert bool(jnp.isnan(y[0]).all()) and bool(jnp.isfinite(y[1]).all())


CONV_CASES = [
    dict(window_strides=(1, 1), padding="SAME"),
    dict(window_strides=(2, 1), padding="VALID", rhs_dilation=(2, 1)),
    dict(window_strides=(1, 2), padding=((2, 0), (1, 1)), lhs_dilation=(2, 1)),
    dict(window_strides=(1, 1), padding="SAME", feature_group_count=2),
]


@pytest.mark.parametrize("conv", CONV_CASES)
@pytest.mark.parametrize("asymmetric", [False, True])
def test_conv_equals_float_conv_of_dequantized_codes(conv, asymmetric):
    rng = np.random.default_rng(1)
    dn = ("NHWC", "HWIO", "NHWC")
    x = jnp.asarray(rng.uniform(0.0, 2.0, (2, 7, 6, 4)), jnp.float32)  # post-ReLU like
    cin = 4 // conv.get("feature_group_count", 1)
    qk = jnp.asarray(rng.integers(-127, 128, (3, 2, cin, 6)), jnp.int8)
    sk = jnp.asarray(rng.uniform(0.01, 0.1, (1, 1, 1, 6)), jnp.float32)
    if asymmetric:
        s, z = jol.quant.affine_params(x.min(), x.max(), bits=8, symmetric=False)
        qx, sx = quantize_with(x, s, z), s
    else:
        (qx, sx), z = jol.quantize_activations(x, reduce_axes=(1, 2, 3)), None
    y = jax.jit(functools.partial(jol.int8_conv_general_dilated, dimension_numbers=dn, **conv))(
        qx, qk, lhs_scale=sx, rhs_scale=sk, lhs_zero_point=z)
    ref = jax.lax.conv_general_dilated(dequant(qx, sx, z), dequant(qk, sk), dimension_numbers=dn,
                                       precision=jax.lax.Precision.HIGHEST, **conv)
    chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec, lhs_shape, rhs_shape, reduce_axes, channel_axis", [
    ("btk,kn->btn", (2, 3, 5), (5, 4), (2,), 1),
    ("...k,kn->...n", (2, 3, 5), (5, 4), (2,), 1),
    ("bhk,khn->bnh", (2, 3, 5), (5, 3, 4), (2,), 2),
    ("bk,nk->nb", (3, 5), (4, 5), (1,), 0),
])
def test_einsum_equals_float_einsum(spec, lhs_shape, rhs_shape, reduce_axes, channel_axis):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(-0.2, 3.0, lhs_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)

    @jax.jit
    def check(x, w):
        qw = jol.quantize(w, bits=8, granularity="channel", axis=channel_axis)
        sw = qw.scale.reshape([n if i == channel_axis else 1 for i, n in enumerate(rhs_shape)])
        s, z = jol.quant.affine_params(x.min(), x.max(), bits=8, symmetric=False)
        outs = []
        for qx, sx, zx in [(*jol.quantize_activations(x, reduce_axes=reduce_axes), None),
                           (quantize_with(x, s, z), s, z)]:
            y = jol.int8_einsum(spec, qx, qw.qvalue, lhs_scale=sx, rhs_scale=sw,
                                lhs_zero_point=zx)
            ref = jnp.einsum(spec, dequant(qx, sx, zx), qw.dequantize(),
                             precision=jax.lax.Precision.HIGHEST)
            outs.append((y, ref))
        return outs

    for y, ref in check(x, w):
        chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-4)


def test_bad_inputs_raise():
    q = jnp.ones((2, 3), jnp.int8)
    dims = (((1,), (0,)), ((), ()))
    with pytest.raises(TypeError, match="int8"):
        jol.int8_dot_general(q.astype(jnp.float32), q.T, dims, lhs_scale=1.0, rhs_scale=1.0)
    with pytest.raises(ValueError, match="lhs_scale.*contracted"):
        jol.int8_dot_general(q, q.T, dims, lhs_scale=jnp.ones((2, 3)), rhs_scale=1.0)
    with pytest.raises(ValueError, match="rhs_scale"):
        jol.int8_dot_general(q, q.T, dims, lhs_scale=1.0, rhs_scale=jnp.ones((3,)))
    with pytest.raises(ValueError, match="zero_point must be a scalar"):
        jol.int8_conv_general_dilated(q[None, :, :, None], q[:, :, None, None], (1, 1), "SAME",
                                      lhs_scale=1.0, rhs_scale=1.0,
                                      lhs_zero_point=jnp.zeros((1, 1, 1, 1), jnp.int8),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for spec in ("ab,bc", "ab,bc,cd->ad", "aa,ab->b", "ab,bc->c"):
        with pytest.raises(ValueError, match="einsum"):
            parse_einsum(spec, 2, 2)


# Regression tests for faults the fuzz tests found (issue 7).
NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("dims, match", [
    ((((5,), (0,)), ((), ())), "lhs contracting axis 5"),
    ((((1,), (-3,)), ((), ())), "rhs contracting axis -3"),
    ((((1,), (0,)), ((2,), (1,))), "lhs batch axis 2"),
    ((((-2,), (-2,)), ((), ())), "distinct axes of equal sizes"),  # in range, sizes 2 vs 3
    ((((1, 1), (0, 0)), ((), ())), "distinct axes"),
])
def test_dot_general_axes_out_of_range_or_mismatched_raise(dims, match):
    lhs, rhs = jnp.ones((2, 3), jnp.int8), jnp.ones((3, 4), jnp.int8)
    with pytest.raises(ValueError, match=match):
        jol.int8_dot_general(lhs, rhs, dims, lhs_scale=1.0, rhs_scale=1.0)


@pytest.mark.parametrize("padding", ["BOGUS", ((1, 0),), ((1, 0, 2), (0, 0)), ((0.5, 0), (0, 0)),
                                     3])
@pytest.mark.parametrize("zero_point", [None, 5])
def test_conv_bad_padding_raises_value_error_up_front(padding, zero_point):
    z = None if zero_point is None else jnp.int8(zero_point)
    with pytest.raises(ValueError, match="padding"):
        jol.int8_conv_general_dilated(
            jnp.ones((1, 4, 4, 1), jnp.int8), jnp.ones((2, 2, 1, 1), jnp.int8), (1, 1),
            padding, lhs_scale=1.0, rhs_scale=1.0, lhs_zero_point=z, dimension_numbers=NHWC)


@pytest.mark.parametrize("padding", ["same", "SAME_LOWER", ((1, 0), (np.int64(0), 1))])
def test_conv_accepts_every_lax_padding_form_with_and_without_zero_point(padding):
    x = jnp.asarray(np.arange(16).reshape(1, 4, 4, 1) % 7, jnp.int8)
    k = jnp.asarray([[1, -2], [3, 1]], jnp.int8).reshape(2, 2, 1, 1)
    ref = jax.lax.conv_general_dilated(x.astype(jnp.float32) - 2.0, k.astype(jnp.float32),
                                       (1, 1), padding, dimension_numbers=NHWC)
    y = jol.int8_conv_general_dilated(x, k, (1, 1), padding, lhs_scale=1.0, rhs_scale=1.0,
                                      lhs_zero_point=jnp.int8(2), dimension_numbers=NHWC)
    chex.assert_trees_all_equal(y, ref)
    y0 = jol.int8_conv_general_dilated(x, k, (1, 1), padding, lhs_scale=1.0, rhs_scale=1.0,
                                       dimension_numbers=NHWC)
    chex.assert_trees_all_equal(y0, jax.lax.conv_general_dilated(
        x.astype(jnp.float32), k.astype(jnp.float32), (1, 1), padding, dimension_numbers=NHWC))


def _lowered_for_gpu(fn, *shapes) -> str:
    """StableHLO text of ``fn`` lowered for CUDA (no GPU needed to lower)."""
    specs = [jax.ShapeDtypeStruct(s, jnp.int8) for s in shapes]
    return jax.export.export(jax.jit(fn), platforms=("cuda",))(*specs).mlir_module()


@pytest.mark.parametrize("k, padded", [(5, 8), (7, 8), (1, 4), (8, None), (64, None)])
def test_gpu_int8_contractions_are_padded_to_a_multiple_of_4(k, padded):
    # XLA GPU (jax 0.11.2, H200) doubled int8 sums of contraction lengths like 5 and 7;
    # lengths that are multiples of 4 came out exact, so off CPU they are padded with zeros.
    text = _lowered_for_gpu(lambda a, b: jol.int8_dot_general(
        a, b, DOT, lhs_scale=1.0, rhs_scale=1.0), (2, 3, k), (2, k, 4))
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all("xi8>" in line for line in dots)
    if padded is None:
        assert "stablehlo.pad" not in text
    else:
        assert f"tensor<2x3x{padded}xi8>" in dots[0] and f"tensor<2x{padded}x4xi8>" in dots[0]


def test_gpu_int8_conv_runs_on_float_codes_at_full_precision():
    # XLA GPU's int8 convolution gave wrong sums (1 input channel, zero-point padding).
    text = _lowered_for_gpu(lambda x, k: jol.int8_conv_general_dilated(
        x, k, (1, 1), "SAME", lhs_scale=1.0, rhs_scale=1.0, lhs_zero_point=jnp.int8(2),
        dimension_numbers=NHWC), (1, 4, 4, 1), (2, 2, 1, 1))
    convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    assert len(convs) == 1 and "xf32>" in convs[0] and "HIGHEST" in convs[0]


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 3), st.booleans())
def test_padded_contraction_gives_the_same_exact_sums(m, k, n, batched):
    # What the GPU path computes, checked here on CPU: padding with zeros changes nothing.
    from jaxopt_lab.quant.native import pad_contraction

    rng = np.random.default_rng(k)
    lead = (2,) if batched else ()
    a = jnp.asarray(rng.integers(-128, 128, lead + (m, k)), jnp.int8)
    b = jnp.asarray(rng.integers(-128, 128, lead + (k, n)), jnp.int8)
    dims = (((a.ndim - 1,), (b.ndim - 2,)), ((0,), (0,)) if batched else ((), ()))
    pa, pb = pad_contraction(a, b, dims)
    assert pa.shape[-1] % 4 == 0 and pa.shape[-1] - k < 4 and pb.shape[-2] == pa.shape[-1]
    ref = np.einsum("...mk,...kn->...mn", np.asarray(a, np.int64), np.asarray(b, np.int64))
    got = jax.lax.dot_general(pa, pb, dims, preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("conv", CONV_CASES + [dict(window_strides=(1, 1), padding="VALID")])
@pytest.mark.parametrize("zero_point", [None, -128, 3, 127])
def test_gpu_conv_path_equals_the_integer_path(conv, zero_point):
    # The float-codes convolution used on GPU, run here on CPU against the int32 one.
    from jaxopt_lab.quant.int8_ops import _float_conv_of_codes, _integer_conv

    rng = np.random.default_rng(3)
    groups = conv.get("feature_group_count", 1)
    x = jnp.asarray(rng.integers(-128, 128, (2, 7, 6, 4)), jnp.int8)
    k = jnp.asarray(rng.integers(-127, 128, (3, 2, 4 // groups, 6)), jnp.int8)
    kw = dict(rhs_dilation=conv.get("rhs_dilation"), feature_group_count=groups,
              dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, k.shape, NHWC))
    z = None if zero_point is None else jnp.int8(zero_point)
    padding = conv["padding"]
    if isinstance(padding, str) and conv.get("lhs_dilation"):
        pytest.skip("string padding with lhs_dilation is not supported")
    args = (conv["window_strides"], padding, conv.get("lhs_dilation"), z)
    chex.assert_trees_all_equal(_float_conv_of_codes(x, k, *args, **kw),
                                _integer_conv(x, k, *args, **kw))


@pytest.mark.parametrize("dims, lhs_shape, rhs_shape, channel_axis", [
    ((((1,), (0,)), ((), ())), (4, 6), (6, 3), 1),             # Dense
    ((((0,), (1,)), ((), ())), (6, 4), (3, 6), 0),             # transposed operands
    ((((1, 2), (0, 1)), ((), ())), (4, 2, 3), (2, 3, 5), 2),   # DenseGeneral, two axes
    ((((2,), (1,)), ((1,), (0,))), (4, 3, 6), (3, 6, 2), None),  # batch axis: XLA path
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weight_only_dot_general_is_the_dequantized_dot(dims, lhs_shape, rhs_shape,
                                                        channel_axis, dtype):
    from jaxopt_lab.quant.int8_ops import weight_only_dot_general
    # Imported by name: run alone, nothing else has imported the submodule yet.
    from jaxopt_lab.quant.interceptor import kernel_scale

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(lhs_shape), dtype)
    w = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)
    qw = jol.quantize(w, bits=8, granularity="tensor" if channel_axis is None else "channel",
                      axis=-1 if channel_axis is None else channel_axis)
    scale = kernel_scale(qw)
    y = jax.jit(lambda x, q, s: weight_only_dot_general(x, q, dims, rhs_scale=s))(
        x, qw.qvalue, scale)
    ref = jax.lax.dot_general(x, jol.dequantize(qw).astype(dtype), dims,
                              precision=jax.lax.Precision.HIGHEST)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    chex.assert_trees_all_close(y.astype(jnp.float32), ref.astype(jnp.float32), rtol=tol,
                                atol=tol * float(jnp.abs(ref.astype(jnp.float32)).max()))


@settings(max_examples=30)
@given(st.sampled_from([(1, 1), (2, 2), (2, 1)]),
       st.sampled_from(["SAME", "VALID", ((1, 0), (2, 1)), ((0, -1), (1, 1))]),
       st.sampled_from([("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"),
                        ("NHWC", "OIHW", "NCHW")]),
       st.sampled_from([(1, 1, 1), (3, 3, 3), (3, 2, 5), (1, 3, 2)]),  # kh, kw, channels in
       st.sampled_from([None, -3]),
       st.integers(0, 2**31 - 1))
def test_conv_patch_matmul_is_bit_identical_to_xla_int32_conv(strides, padding, dn, window,
                                                             zero_point, seed):
    # On CPU with the native kernel, 2-D convolutions run as patches @ kernel (int8_matmul).
    from jaxopt_lab.quant import native

    rng = np.random.default_rng(seed)
    kh, kw, cin = window
    x_nhwc = rng.integers(-128, 128, (2, 7, 6, cin))
    k_hwio = rng.integers(-128, 128, (kh, kw, cin, 5))
    x = jnp.asarray(np.transpose(x_nhwc, ["NHWC".index(a) for a in dn[0]]), jnp.int8)
    k = jnp.asarray(np.transpose(k_hwio, ["HWIO".index(a) for a in dn[1]]), jnp.int8)
    z = None if zero_point is None else jnp.int8(zero_point)

    def conv(x, k):
        return jol.int8_conv_general_dilated(x, k, strides, padding, lhs_scale=1.0,
                                             rhs_scale=1.0, lhs_zero_point=z,
                                             dimension_numbers=dn)

    fast = jax.jit(conv)(x, k)
    with native.use_native_int8(False):  # a new function: jax caches traces per function
        plain = jax.jit(lambda x, k: conv(x, k))(x, k)  # XLA's int32 convolution
        assert "ffi_call" not in str(jax.make_jaxpr(lambda x, k: conv(x, k))(x, k))
    np.testing.assert_array_equal(fast, plain)


def test_xla_int8_conv_with_a_constant_zero_point_of_zero_and_padding_is_exact():
    # The case that fused pad + int8 conv into wrong sums on XLA's CPU backend.
    from jaxopt_lab.quant import native

    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (1, 1, 1, 32))
    k = rng.integers(-128, 128, (1, 1, 32, 5))
    ref = np.concatenate([np.einsum("nhwc,co->nhwo", x, k[0, 0]), np.zeros((1, 1, 1, 5))], 2)
    for use_native in (True, False):
        with native.use_native_int8(use_native):
            y = jax.jit(lambda x, k: jol.int8_conv_general_dilated(
                x, k, (1, 1), ((0, 0), (0, 1)), lhs_scale=1.0, rhs_scale=1.0,
                lhs_zero_point=jnp.int8(0), dimension_numbers=("NHWC", "HWIO", "NHWC")))(
                    jnp.asarray(x, jnp.int8), jnp.asarray(k, jnp.int8))
        np.testing.assert_array_equal(y, ref.astype(np.float32))


PADS = st.tuples(st.integers(0, 5), st.integers(0, 5))  # up to larger than window - 1


@settings(max_examples=40)
@given(st.sampled_from([(1, 1), (3, 3), (2, 3), (5, 2)]), st.sampled_from([1, 3, 16, 32, 64, 65]),
       st.sampled_from([1, 2, 7]), st.sampled_from([(1, 1), (2, 2), (3, 1)]),
       st.one_of(st.sampled_from(["SAME", "VALID"]), st.tuples(PADS, PADS)),
       st.integers(1, 7), st.integers(1, 7), st.sampled_from([None, 0, -3, 127, -128]),
       st.integers(0, 2**31 - 1))
def test_conv_implicit_padding_equals_the_exact_integer_conv(window, cin, batch, strides,
                                                             padding, h, w, zero_point, seed):
    # The native kernel reads the unpadded codes and gathers border windows with the
    # padding value (the zero point, or 0): the exact sums of the padded codes minus the
    # zero point (int64 numpy), and no padded copy of the input in the compiled program
    # (unless the channels are padded anyway or most windows touch the padding).
    # XLA's own int32 convolution (the fallback without the native kernel) must give the
    # same sums: with a constant zero point of 0 it once fused the pad into the int8
    # convolution and returned garbage (jax 0.10.2) or failed to compile (jax 0.12.1).
    from jaxopt_lab.quant import native

    kh, kw = window
    pads = padding
    if isinstance(padding, str):
        pads = tuple(jax.lax.padtype_to_pads((h, w), window, strides, padding))
    hypothesis.assume(h + sum(pads[0]) >= kh and w + sum(pads[1]) >= kw)
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (batch, h, w, cin))
    k = rng.integers(-128, 128, (kh, kw, cin, 5))
    z = None if zero_point is None else jnp.int8(zero_point)

    def conv(x, k):
        return jol.int8_conv_general_dilated(x, k, strides, padding, lhs_scale=1.0,
                                             rhs_scale=1.0, lhs_zero_point=z,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fast = jax.jit(conv)
    y = fast(jnp.asarray(x, jnp.int8), jnp.asarray(k, jnp.int8))
    xp = np.pad(x - (zero_point or 0), ((0, 0), pads[0], pads[1], (0, 0)))
    (sh, sw), (ho, wo) = strides, y.shape[1:3]
    ref = sum(np.einsum("nhwc,co->nhwo",
                        xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw], k[i, j])
              for i in range(kh) for j in range(kw))
    np.testing.assert_array_equal(y, ref.astype(np.float32))
    with native.use_native_int8(False):  # a new function: jax caches traces per function
        plain = jax.jit(lambda x, k: conv(x, k))(jnp.asarray(x, jnp.int8),
                                                 jnp.asarray(k, jnp.int8))
    np.testing.assert_array_equal(plain, ref.astype(np.float32))
    from jaxopt_lab.quant.int8_ops import _border_fraction

    if (native.native_int8_available() and (kw * cin) % 4 == 0
            and _border_fraction((h, w), window, strides, pads) <= 0.5):
        hlo = fast.lower(jnp.asarray(x, jnp.int8), jnp.asarray(k, jnp.int8)).compile().as_text()
        assert re.search(r"\bpad\(", hlo) is None
