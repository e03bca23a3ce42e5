"""fake_quant (STE) and LSQ: forward equals quantize-dequantize, gradients as specified."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab.quant.affine import round_half_away
from jaxopt_lab.quant.fake_quant import lsq_bounds

SHAPE = (6, 4)
# Each bit width, granularity and mode at least once (every config costs a compile).
CONFIGS = [dict(bits=b, granularity=g, symmetric=s, group_size=2) for b, g, s in [
    (2, "group", False), (2, "tensor", True), (3, "channel", True), (4, "tensor", False),
    (4, "group", True), (8, "channel", False), (8, "channel", True)]]
CONFIGS += [dict(dtype="float8_e4m3fn"), dict(dtype="float8_e5m2", granularity="tensor")]

_x = hnp.arrays(np.float32, SHAPE, elements=st.one_of(st.just(0.0), st.floats(-100, 100,
                                                                                width=32)))


@given(_x, st.integers(0, len(CONFIGS) - 1))
def test_forward_is_exactly_dequantize_of_quantize(x, i):
    x = jnp.asarray(x)
    want = jol.dequantize(jol.quantize(x, **CONFIGS[i]))
    chex.assert_trees_all_equal(jol.fake_quant(x, **CONFIGS[i]), want)


@pytest.mark.parametrize("i", [0, 5, len(CONFIGS) - 2])
def test_ste_gradient_is_one_where_nothing_is_clipped(i):
    x = jax.random.normal(jax.random.PRNGKey(i), SHAPE).at[0].set(0.0)
    u = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) - 3.0
    f = lambda x: jnp.sum(u * jol.fake_quant(x, **CONFIGS[i]))
    value, grad = jax.jit(jax.value_and_grad(f))(x)
    np.testing.assert_allclose(value, f(x), rtol=1e-6)
    # min/max scales never clip a finite value, so the STE derivative is exactly 1.
    chex.assert_trees_all_equal(grad, u)
    chex.assert_trees_all_equal(jax.grad(f)(x), u)  # and without jit


def test_forward_mode_jvp_and_vmap_pmap():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 4))
    y, t = jax.jvp(lambda v: jol.fake_quant(v, bits=4), (x[0],), (jnp.ones((3, 4)),))
    chex.assert_trees_all_equal(t, jnp.ones((3, 4)))
    per = jnp.stack([jol.fake_quant(v, bits=4) for v in x])
    chex.assert_trees_all_equal(jax.vmap(lambda v: jol.fake_quant(v, bits=4))(x), per)
    pmapped = jax.pmap(lambda v: jol.fake_quant(v, bits=4), devices=jax.devices()[:2])
    chex.assert_trees_all_equal(pmapped(x[:2]), per[:2])


def test_tree_mode_uses_where_and_keeps_dtypes():
    tree = {"k": jax.random.normal(jax.random.PRNGKey(1), (4, 4), jnp.bfloat16),
            "b": jnp.linspace(-1, 1, 4), "n": jnp.arange(3)}
    out = jol.fake_quant(tree, bits=2)
    assert out["b"] is tree["b"] and out["n"] is tree["n"]
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    assert len(np.unique(np.asarray(out["k"], np.float32)[:, 0])) <= 3
    # a bare array is always selected, even 1-D
    assert len(np.unique(np.asarray(jol.fake_quant(tree["b"], bits=2, granularity="tensor")))) == 3
    with pytest.raises(ValueError, match=r"\['n'\].*floating-point"):
        jol.fake_quant(tree, where=lambda p, x: p[0].key == "n")


def test_qat_with_optax_reduces_loss_under_jit():
    k = jax.random.split(jax.random.PRNGKey(2), 2)
    x = jax.random.normal(k[0], (64, 8))
    w_true = jax.random.normal(k[1], (8, 4))
    y = x @ w_true
    loss = lambda w: jnp.mean((x @ jol.fake_quant(w, bits=4) - y) ** 2)
    tx = optax.adam(0.05)
    w = jnp.zeros((8, 4)) + 0.01
    state = tx.init(w)

    @jax.jit
    def step(w, state):
        value, g = jax.value_and_grad(loss)(w)
        u, state = tx.update(g, state)
        return optax.apply_updates(w, u), state, value

    first = None
    for _ in range(60):
        w, state, value = step(w, state)
        first = value if first is None else first
    assert float(loss(w)) < 0.1 * float(first)


# --- LSQ -------------------------------------------------------------------------------


def _lsq_reference_grads(v, s, u, bits, signed):
    """Esser et al. 2020, eq. 3 and the gradient scale, in numpy (float64)."""
    qn, qp = lsq_bounds(bits, signed)
    r = v.astype(np.float64) / s
    inside = (r > -qn) & (r < qp)
    dv = np.where(inside, u, 0.0)
    rounded = np.asarray(round_half_away(jnp.asarray(r, jnp.float32)), np.float64)
    ds_elem = np.where(inside, rounded - r, np.where(r <= -qn, -qn, qp))
    n = v.size // s.size
    red = tuple(i for i in range(v.ndim) if s.shape[i] == 1)
    ds = np.sum(u * ds_elem, axis=red, keepdims=True) / math.sqrt(n * qp)
    return dv, ds


@functools.cache
def _lsq_grad(bits, signed):
    f = lambda v, s, u: jnp.sum(u * jol.lsq_fake_quant({"w": v}, {"w": s}, bits=bits,
                                                       signed=signed)["w"])
    return jax.jit(jax.grad(f, argnums=(0, 1)))


@given(hnp.arrays(np.float32, SHAPE, elements=st.floats(-4, 4, width=32, allow_subnormal=False)),
       st.sampled_from([(2, True), (4, True), (3, False)]), st.booleans())
def test_lsq_gradients_match_the_paper(v, cfg, per_channel):
    bits, signed = cfg
    s = np.full((1, SHAPE[1]) if per_channel else (1, 1), 0.3, np.float32)
    if per_channel:
        s = s * np.array([[0.5, 1.0, 2.0, 4.0]], np.float32)  # some values clip, some don't
    u = np.arange(v.size, dtype=np.float32).reshape(SHAPE) / 7 - 1
    dv, ds = _lsq_grad(bits, signed)(jnp.asarray(v), jnp.asarray(s), jnp.asarray(u))
    want_dv, want_ds = _lsq_reference_grads(v, s, u, bits, signed)
    np.testing.assert_array_equal(dv, want_dv)  # STE: 1 inside, 0 where clipped
    np.testing.assert_allclose(ds, want_ds, rtol=1e-4, atol=1e-5)


def test_lsq_forward_init_and_bad_steps():
    p = {"w": jnp.array([[0.1, -0.7], [0.35, 2.0]]), "b": jnp.ones(2)}
    steps = jol.lsq_init(p, bits=4)
    assert steps["b"] is None and steps["w"].shape == (1, 1)
    np.testing.assert_allclose(steps["w"], 2 * np.mean(np.abs(p["w"])) / np.sqrt(7), rtol=1e-6)
    out = jol.lsq_fake_quant(p, {"w": jnp.full((1, 1), 0.25), "b": None}, bits=3)
    assert out["b"] is p["b"]
    np.testing.assert_array_equal(out["w"], [[0.0, -0.75], [0.25, 0.75]])
    ch = jol.lsq_init(p, bits=8, granularity="channel", where=lambda path, x: x.ndim == 2)
    assert ch["w"].shape == (1, 2) and ch["b"] is None
    bad = jol.lsq_fake_quant(p, {"w": jnp.full((1, 1), -1.0), "b": None}, bits=3)
    assert np.isnan(np.asarray(bad["w"])).all()  # a non-positive step is visible
    with pytest.raises(ValueError, match=r"\['w'\]: step of shape"):
        jol.lsq_fake_quant(p, {"w": jnp.float32(0.1), "b": None}, bits=3)
    with pytest.raises(ValueError, match="bits must be one of"):
        jol.lsq_init(p, bits=6)


def test_lsq_where_overrides_bits_and_training_learns_steps():
    k = jax.random.split(jax.random.PRNGKey(3), 2)
    p = {"first": jax.random.normal(k[0], (8, 8)), "rest": jax.random.normal(k[1], (8, 8))}
    where = lambda path, x: {"bits": 8} if path[0].key == "first" else True
    steps = jol.lsq_init(p, bits=2, where=where)
    np.testing.assert_allclose(steps["first"], 2 * jnp.mean(jnp.abs(p["first"])) / np.sqrt(127),
                               rtol=1e-6)
    target = p["rest"]

    def loss(steps):
        out = jol.lsq_fake_quant(p, steps, bits=2, where=where)
        return jnp.mean((out["rest"] - target) ** 2) + jnp.mean((out["first"] - p["first"]) ** 2)

    tx = optax.adam(0.02)
    state = tx.init(steps)

    @jax.jit
    def step(steps, state):
        u, state = tx.update(jax.grad(loss)(steps), state)
        return optax.apply_updates(steps, u), state

    first = float(loss(steps))
    for _ in range(40):
        steps, state = step(steps, state)
    assert float(loss(steps)) < first


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_lsq_steps_and_outputs_stay_finite_at_the_dtype_max(dtype):
    # lsq_init summed |v| in float32 (an inf step for huge leaves, then NaN), and the top
    # level round(v / s) * s overflowed float16/bfloat16 leaves to inf.
    top = float(jnp.finfo(dtype).max)
    p = {"w": jnp.full((2, 2), top, dtype).at[1, 1].set(-top / 3)}
    steps = jol.lsq_init(p, bits=8)
    mean = np.mean(np.abs(np.asarray(p["w"], np.float64)))
    np.testing.assert_allclose(steps["w"], 2 * mean / np.sqrt(127), rtol=1e-6)
    if dtype == jnp.float32:  # 2 * mean|v| / sqrt(Q_P) itself beyond float32: clamped
        assert float(jol.lsq_init(p, bits=2)["w"][0, 0]) == top
    f = jax.jit(lambda p, s: jol.lsq_fake_quant(p, s, bits=8))
    out = np.asarray(f(p, steps)["w"], np.float64)
    assert np.isfinite(out).all() and out[0, 0] == top  # level 1.07 * top, clamped
    assert np.abs(out - np.asarray(p["w"], np.float64)).max() <= float(steps["w"][0, 0]) / 2
    dv, ds = jax.grad(lambda p, s: jnp.sum(f(p, s)["w"].astype(jnp.float32)), (0, 1))(p, steps)
    np.testing.assert_array_equal(dv["w"], np.ones((2, 2)))  # STE: nothing clipped
    assert np.isfinite(np.asarray(ds["w"])).all()
