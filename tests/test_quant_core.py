"""quantize / dequantize: affine round-trip bounds, idempotence, zeros, structure, errors."""

import doctest
import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab.quant import affine, qtensor

SHAPE = (8, 6)
# (bits, granularity, symmetric): every bit width, granularity and mode appears.
CONFIGS = [(b, g, s) for b in (2, 3, 4, 8) for g in ("tensor", "channel", "group")
           for s in (True, False)]


def _kw(bits, gran, sym):
    return dict(bits=bits, granularity=gran, symmetric=sym, group_size=4)


@functools.cache
def _jitted(bits, gran, sym):
    return jax.jit(lambda x: jol.quantize(x, **_kw(bits, gran, sym)))


_floats = st.one_of(
    st.just(0.0),
    st.floats(-1e3, 1e3, width=32),
    st.floats(-2.0**-100, 2.0**-100, width=32),
    st.sampled_from([1e30, -1e30, 0.5, -0.5, 1.0]),
)


@st.composite
def case(draw):
    x = draw(hnp.arrays(np.float32, SHAPE, elements=_floats))
    if draw(st.booleans()):
        x[:, draw(st.integers(0, SHAPE[1] - 1))] = 0.0  # an all-zero channel
    if draw(st.booleans()):
        x[:, 0] = draw(st.floats(-5, 5, width=32))  # a constant channel
    return x, draw(st.sampled_from(CONFIGS))


def _full_scale(qt):
    """Scale broadcast to the tensor's shape."""
    return np.asarray(jax.jit(lambda s: qtensor._broadcast(s, (), qt))(qt.scale)
                      * jnp.ones(qt.shape if qt.granularity != "group" else
                                 (qt.shape[0] // qt.group_size, qt.group_size, qt.shape[1]))
                      ).reshape(qt.shape)


@given(case())
def test_roundtrip_error_at_most_half_a_step(c):
    x, cfg = c
    qt = jol.quantize(jnp.asarray(x), **_kw(*cfg))
    xh = np.asarray(jol.dequantize(qt))
    s = _full_scale(qt)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    tol = 0.5 * s + 2.0**-21 * (np.abs(x) + np.abs(xh)) + 1e-38
    assert np.all(np.abs(x - xh) <= tol)
    assert np.all(xh[x == 0] == 0)  # exact zeros stay exactly zero


@given(case())
def test_quantize_is_idempotent_and_jit_equals_no_jit(c):
    x, cfg = c
    qt = jol.quantize(jnp.asarray(x), **_kw(*cfg))
    chex.assert_trees_all_equal(_jitted(*cfg)(jnp.asarray(x)), qt)
    again = jol.quantize(jol.dequantize(qt), **_kw(*cfg))
    np.testing.assert_array_equal(again.qvalue, qt.qvalue)
    if qt.symmetric:
        np.testing.assert_array_equal(again.scale, qt.scale)
    else:  # scale from a sum of two divisions: equal within float rounding
        np.testing.assert_array_equal(again.zero_point, qt.zero_point)
        np.testing.assert_allclose(again.scale, qt.scale, rtol=5e-7)


def test_no_jit_equals_jit():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    kw = dict(bits=3, symmetric=False, granularity="group", group_size=2)
    with jax.disable_jit():
        eager = jol.quantize(x, **kw)
        deq = jol.dequantize(eager)
    chex.assert_trees_all_equal(eager, jol.quantize(x, **kw))
    chex.assert_trees_all_equal(deq, jax.jit(jol.dequantize)(eager))


@pytest.mark.parametrize("fmt, rel, tiny", [("float8_e4m3fn", 2.0**-4, 2.0**-9),
                                            ("float8_e5m2", 2.0**-3, 2.0**-16)])
def test_fp8_roundtrip_relative_error(fmt, rel, tiny):
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 8))) * np.logspace(-3, 3, 8)
    x[3] = 0.0
    qt = jol.quantize(jnp.asarray(x, jnp.float32), dtype=fmt)
    xh = np.asarray(jol.dequantize(qt))
    s = np.asarray(qt.scale)[None, :]
    assert np.all(np.abs(x - xh) <= rel * np.abs(x) + tiny * s + 1e-6 * np.abs(x))
    assert np.all(xh[3] == 0)


def test_all_zero_constant_tiny_and_huge_slices_get_positive_finite_scales():
    x = np.zeros((4, 5), np.float32)
    x[:, 1] = 2.5
    x[:, 2] = -1e-44  # subnormal
    x[:, 3] = [3e38, -3e38, 1.0, 0.0]
    for sym in (True, False):
        for gran in ("tensor", "channel"):
            qt = jol.quantize(jnp.asarray(x), bits=4, granularity=gran, symmetric=sym)
            assert np.all(np.asarray(qt.scale) > 0) and np.all(np.isfinite(qt.scale))
            assert np.all(np.isfinite(jol.dequantize(qt)))
    qt = jol.quantize(jnp.asarray(x), bits=8)
    np.testing.assert_array_equal(jol.dequantize(qt)[:, 1], x[:, 1])  # constants exact
    assert float(qt.scale[0]) == 1.0


def test_tree_structure_dtypes_and_unselected_leaves_preserved():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    tree = {"dense": {"kernel": jax.random.normal(k[0], (8, 4), jnp.bfloat16),
                      "bias": jnp.ones(4)},
            "conv": [jax.random.normal(k[1], (3, 3, 4, 8), jnp.float16), None],
            "step": jnp.array(3), "emb": jax.random.normal(k[2], (10, 4))}
    q = jol.quantize(tree, bits=4, granularity="group", group_size=2)
    assert q["dense"]["bias"] is tree["dense"]["bias"] and q["step"] is tree["step"]
    assert q["conv"][1] is None
    assert all(isinstance(v, jol.QTensor) for v in (q["dense"]["kernel"], q["conv"][0], q["emb"]))
    assert q["conv"][0].group_axis == (2,) and q["conv"][0].scale.shape == (3, 3, 2, 8)
    back = jol.dequantize(q)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, tree)
    chex.assert_trees_all_close(back, tree, atol=0.5, rtol=0.3)
    assert jol.quantize(q)["emb"] is q["emb"]  # existing QTensors are kept


def test_where_mapping_gives_mixed_precision():
    tree = {"first": jnp.ones((4, 8)), "mid": jnp.ones((8, 8)), "last": jnp.ones((8, 2))}
    ends = lambda path, leaf: {"bits": 8} if path[0].key in ("first", "last") else True
    q = jol.quantize(tree, bits=4, where=ends)
    assert [q[k].bits for k in ("first", "mid", "last")] == [8, 4, 8]
    q = jol.quantize(tree, where={"first": False, "mid": {"granularity": "tensor"}, "last": True})
    assert q["first"] is tree["first"] and q["mid"].granularity == "tensor"
    with pytest.raises(ValueError, match=r"\['first'\]: unknown per-leaf setting\(s\) \['bitz'\]"):
        jol.quantize(tree, where=lambda p, x: {"bitz": 4})


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5), "bits must be one of"),
    (dict(bits=True), "bits must be one of"),
    (dict(granularity="row"), "granularity must be one of"),
    (dict(granularity="group"), "positive int group_size"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(dtype="nonsense"), "dtype must be one of"),
    (dict(scale_dtype="float16"), "scale_dtype must be one of"),
    (dict(symmetric="yes"), "symmetric must be a bool"),
    (dict(dtype="float8_e4m3fn", bits=4), "fp8 quantization is symmetric 8-bit"),
    (dict(axis=2), r"\['w'\]: axis 2 out of range"),
    (dict(where=lambda p, x: {"bits": 7}), r"\['w'\]: bits must be one of"),
])
def test_bad_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jol.quantize({"w": jnp.ones((4, 6))}, **kwargs)


@pytest.mark.parametrize("leaf, match", [
    (jnp.ones((4, 4), jnp.int32), "only floating-point"),
    (jnp.ones((4, 4), jnp.complex64), "only floating-point"),
    (jnp.ones((0, 4)), "empty array"),
    (jnp.array([[1.0, jnp.nan]]), "NaN or Inf"),
    (jnp.array([[1.0, -jnp.inf]]), "NaN or Inf"),
    (jnp.float32(1.0), "needs ndim >= 1"),
])
def test_bad_leaves_raise_value_error_naming_the_path(leaf, match):
    with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*" + match):
        jol.quantize({"layer": {"w": leaf}}, where=True)


def test_nan_under_tracing_stays_visible():
    x = jnp.ones((4, 3)).at[1, 2].set(jnp.nan).at[0, 0].set(jnp.inf)
    for sym in (True, False):
        roundtrip = jax.jit(lambda x, s=sym: jol.dequantize(jol.quantize(x, symmetric=s)))
        out = np.asarray(roundtrip(x))
        assert not np.isfinite(out[:, 2]).any() and not np.isfinite(out[:, 0]).any()
        assert np.isfinite(out[:, 1]).all()


@pytest.mark.parametrize("sym", [True, False])
def test_bfloat16_scales_round_up_and_keep_the_bounds(sym):
    x = np.array(jax.random.normal(jax.random.PRNGKey(5), (16, 8)))
    x[:, 2] = 0.0
    kw = dict(bits=4, granularity="group", group_size=4, symmetric=sym, scale_dtype="bfloat16")
    qt = jol.quantize(jnp.asarray(x), **kw)
    ref = jol.quantize(jnp.asarray(x), **{**kw, "scale_dtype": "float32"})
    assert qt.scale.dtype == jnp.bfloat16
    assert np.all(np.asarray(qt.scale, np.float32) >= np.asarray(ref.scale))
    xh = np.asarray(jol.dequantize(qt))
    s = _full_scale(qt)
    assert np.all(np.abs(x - xh) <= 0.5 * s * (1 + 1e-6)) and np.all(xh[:, 2] == 0)
    chex.assert_trees_all_equal(jol.fake_quant(jnp.asarray(x), **kw), jnp.asarray(xh))
    again = jol.quantize(jnp.asarray(xh), **kw)
    if sym:
        chex.assert_trees_all_equal(again, qt)


@given(st.floats(2.0 ** -126, 2.0 ** 127, width=32))
@example(float(np.finfo(np.float32).max))  # above the largest bfloat16: clamped to it
@example(1.0)  # representable: unchanged
def test_bfloat16_scale_rounding_is_the_next_bfloat16_up(scale):
    # By bits: a rounded copy compared with the scale rounds to nearest on GPU (excess
    # precision), where the bounds need rounding up.
    from jaxopt_lab.quant.codes import _round_scale_up

    up = jax.jit(_round_scale_up, static_argnums=1)(jnp.float32(scale), "bfloat16")
    as_bf16 = up.astype(jnp.bfloat16)
    assert up == as_bf16.astype(jnp.float32)  # representable
    if up < np.float32(scale):  # only above the largest bfloat16
        assert as_bf16 == jnp.finfo(jnp.bfloat16).max
    else:
        below = jnp.nextafter(as_bf16, jnp.bfloat16(0)).astype(jnp.float32)
        assert below < np.float32(scale)  # the smallest bfloat16 >= scale


def test_contract_storage_ratios():
    w = {"k": jnp.zeros((1024, 1024)), "b": jnp.zeros(1024)}
    fp = jol.tree_nbytes(w)
    assert fp / jol.tree_nbytes(jol.quantize(w, bits=8)) >= 3.95
    q4 = jol.quantize(w, bits=4, granularity="group", group_size=128)
    assert fp / jol.tree_nbytes(q4) >= 7.45
    q4 = jol.quantize(w, bits=4, granularity="group", group_size=128, scale_dtype="bfloat16")
    assert fp / jol.tree_nbytes(q4) >= 7.7


def test_affine_params_zero_is_exact_and_rounding_is_half_away():
    s, z = affine.affine_params(jnp.array([-1.0, 0.0]), jnp.array([3.0, 0.0]), bits=8,
                                symmetric=False)
    assert s.dtype == jnp.float32 and z.dtype == jnp.int8 and float(s[1]) == 1.0
    q = affine.affine_codes(jnp.zeros(2), s, z, bits=8, symmetric=False)
    np.testing.assert_array_equal(q, z)
    np.testing.assert_array_equal(affine.round_half_away(jnp.array([-2.5, -0.5, 0.5, 1.5, 1.4])),
                                  [-3.0, -1.0, 1.0, 2.0, 1.0])


@pytest.mark.parametrize("name", ["quant.affine", "quant.core", "quant.fake_quant",
                                  "quant.qtensor", "io"])
def test_docstring_examples_run(name):
    module = importlib.import_module(f"jaxopt_lab.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("bits, sym", [(2, True), (3, False)])
def test_huge_scales_keep_bounds_idempotence_and_zeros(bits, sym):
    # scale >= 2**126: XLA used to turn x / scale into x * (1 / scale), a subnormal flushed to
    # 0 (every code 0), and asymmetric end levels (q - z) * s overflowed to inf.
    x = np.array([[3e38, -3e38, 1e38, 0.0], [-1e38, 2.5e38, 1.0, -3.4e38]], np.float32)
    kw = dict(bits=bits, granularity="tensor", symmetric=sym)
    qt = jol.quantize(x, **kw)
    assert float(qt.scale) >= 2.0**126
    xh = np.asarray(jol.dequantize(qt))
    assert np.isfinite(xh).all() and xh[0, 3] == 0
    assert np.abs(xh.astype(np.float64) - x).max() <= 0.5 * float(qt.scale) * (1 + 1e-6)
    chex.assert_trees_all_equal(jax.jit(lambda v: jol.quantize(v, **kw))(x), qt)
    with jax.disable_jit():
        chex.assert_trees_all_equal(jol.quantize(x, **kw), qt)
    chex.assert_trees_all_equal(jol.fake_quant(x, **kw), jnp.asarray(xh))
    again = jol.quantize(xh, **kw)
    np.testing.assert_array_equal(again.qvalue, qt.qvalue)
    if not sym:
        np.testing.assert_array_equal(again.zero_point, qt.zero_point)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_levels_beyond_a_low_precision_dtype_clamp_to_its_max(dtype):
    # 3-bit asymmetric: the lowest level lies ~2.6% beyond -max(dtype) (and beyond float32
    # for bfloat16); it used to come back as -inf.
    top = float(jnp.finfo(dtype).max)
    x = jnp.asarray(np.array([[0.86, -0.935, -0.705, -0.797]]) * top, dtype)
    kw = dict(bits=3, symmetric=False, axis=0)
    qt = jol.quantize(x, **kw)
    back = jol.dequantize(qt)
    assert back.dtype == dtype
    b64, x64 = np.asarray(back, np.float64), np.asarray(x, np.float64)
    assert np.isfinite(b64).all() and np.abs(b64).max() == top
    eps = float(jnp.finfo(dtype).eps)
    assert (np.abs(b64 - x64) <= 0.5 * float(qt.scale[0]) * (1 + 1e-6) + eps * np.abs(x64)).all()
    chex.assert_trees_all_equal(jol.fake_quant(x, **kw), back)
    assert np.isfinite(np.asarray(jol.dequantize(qt, dtype=jnp.float32))).all()


def test_group_size_that_does_not_divide_falls_back_per_channel_and_is_reported():
    tree = {"w": jnp.ones((6, 4)), "v": jnp.ones((8, 4))}
    with pytest.warns(jol.LayoutFallbackWarning, match=r"\['w'\]: group_size 4 does not divide"):
        q = jol.quantize(tree, bits=4, granularity="group", group_size=4)
    assert q["w"].granularity == "channel" and q["w"].axis == (1,)
    assert q["v"].granularity == "group" and q["v"].group_axis == (0,)


def test_explicit_group_override_or_bare_array_that_does_not_fit_raises():
    tree = {"w": jnp.ones((6, 4))}
    with pytest.raises(ValueError, match=r"\['w'\]: group_size 4 does not divide"):
        jol.quantize(tree, bits=4, where=lambda p, x: {"granularity": "group", "group_size": 4})
    with pytest.raises(ValueError, match="group_size 4 does not divide"):
        jol.quantize(tree["w"], bits=4, granularity="group", group_size=4)
