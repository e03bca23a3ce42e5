"""Properties of distill_loss (Hinton KD) and feature_distill_loss (FitNets hints)."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab.distill import init_projection, project

TEMPERATURES = (0.5, 1.0, 3.0, 10.0)
ALPHAS = (0.0, 0.3, 1.0)


# ---------------------------------------------------------------- numpy reference (float64)
def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_distill(t, s, temperature, alpha, labels=None, mask=None):
    """Textbook Hinton KD in float64: KL summed over classes, averaged over positions."""
    log_pt = _np_log_softmax(np.asarray(t, np.float64) / temperature)
    log_ps = _np_log_softmax(np.asarray(s, np.float64) / temperature)
    pt = np.exp(log_pt)
    with np.errstate(invalid="ignore"):
        kl = np.where(pt > 0, pt * (log_pt - log_ps), 0.0).sum(-1)
    per = alpha * temperature**2 * kl
    if alpha < 1:
        ce = -np.take_along_axis(_np_log_softmax(s), labels[..., None], -1)[..., 0]
        per = per + (1 - alpha) * ce
    if mask is None:
        return per.mean()
    w = np.broadcast_to(np.asarray(mask, np.float64), per.shape)
    return (per * w).sum() / w.sum() if w.sum() > 0 else 0.0


# ---------------------------------------------------------------- strategies
@st.composite
def logits_pairs(draw, max_value=1e4):
    # Few distinct shapes: each one compiles once.
    b = draw(st.sampled_from([1, 3]))
    c = draw(st.sampled_from([1, 2, 7]))
    scale = draw(st.sampled_from([1.0, 30.0, max_value]))
    elems = st.floats(-1.0, 1.0, width=32)
    t = draw(hnp.arrays(np.float32, (b, c), elements=elems)) * np.float32(scale)
    s = draw(hnp.arrays(np.float32, (b, c), elements=elems)) * np.float32(scale)
    labels = draw(hnp.arrays(np.int32, (b,), elements=st.integers(0, c - 1)))
    return t, s, labels


def _tol(t, s, temperature):
    # float32 rounds t/T and s/T to ~6e-8 relative; the T^2 factor scales that error by T.
    return 1e-5 + 3e-7 * max(temperature, 1.0) * (1 + np.abs(t).max() + np.abs(s).max())


# temperature and alpha traced: one compile per shape, and the traced-settings path tested.
_loss = jax.jit(jol.distill_loss)
_student_grad = jax.jit(jax.grad(jol.distill_loss, argnums=1))


# ---------------------------------------------------------------- distill_loss values
@given(logits_pairs(), st.sampled_from(TEMPERATURES), st.sampled_from(ALPHAS))
def test_matches_numpy_reference_and_is_nonnegative(pair, temperature, alpha):
    t, s, labels = pair
    got = float(_loss(t, s, temperature=temperature, alpha=alpha, labels=labels))
    want = np_distill(t, s, temperature, alpha, labels)
    assert np.isfinite(got)
    assert got >= 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=_tol(t, s, temperature))


@given(logits_pairs(), st.sampled_from(TEMPERATURES), st.sampled_from(ALPHAS))
def test_identical_logits_leave_only_cross_entropy(pair, temperature, alpha):
    t, _, labels = pair
    got = _loss(t, t, temperature=temperature, alpha=alpha, labels=labels)
    ce = -np.take_along_axis(_np_log_softmax(t), labels[:, None], -1).mean()
    np.testing.assert_allclose(got, (1 - alpha) * ce, rtol=1e-5, atol=_tol(t, t, 1.0))
    if alpha == 1.0:
        assert float(got) == 0.0


@given(logits_pairs(max_value=100.0), st.sampled_from(TEMPERATURES), st.sampled_from(ALPHAS),
       st.integers(0, 2**31 - 1), st.booleans())
def test_invariant_to_a_constant_added_to_a_logits_row(pair, temperature, alpha, seed, to_teacher):
    t, s, labels = pair
    shift = np.random.default_rng(seed).uniform(-50, 50, (t.shape[0], 1)).astype(np.float32)
    base = _loss(t, s, temperature=temperature, alpha=alpha, labels=labels)
    t2, s2 = (t + shift, s) if to_teacher else (t, s + shift)
    moved = _loss(t2, s2, temperature=temperature, alpha=alpha, labels=labels)
    np.testing.assert_allclose(moved, base, rtol=1e-5, atol=_tol(t2, s2, temperature))


@given(logits_pairs(), st.sampled_from(TEMPERATURES), st.sampled_from(ALPHAS))
def test_student_gradient_matches_closed_form(pair, temperature, alpha):
    t, s, labels = pair
    grad = _student_grad(t, s, temperature=temperature, alpha=alpha, labels=labels)
    b, c = s.shape
    soft = lambda z: np.exp(_np_log_softmax(z))  # noqa: E731
    want = alpha * temperature * (soft(s / temperature) - soft(t / temperature)) / b
    want += (1 - alpha) * (soft(s) - np.eye(c)[labels]) / b
    np.testing.assert_allclose(grad, want, atol=1e-5 * max(temperature, 1.0))


def test_teacher_gets_no_gradient():
    t, s = jnp.array([[2.0, -1.0, 0.5]]), jnp.array([[0.0, 1.0, 3.0]])
    g = jax.grad(lambda t_: jol.distill_loss(t_, s, temperature=2.0))(t)
    chex.assert_trees_all_equal(g, jnp.zeros_like(t))


def test_large_temperature_is_centred_logit_matching():
    # Second-order expansion around the uniform distribution:
    #   KL(softmax(t/T) || softmax(s/T)) = sum_c (d_c - mean(d))^2 / (2 C T^2) + O(1/T^3),
    # with d = t - s, so T^2 KL -> sum_c (d_c - mean d)^2 / (2C): half the mean squared
    # error of the mean-centred logits. The relative error shrinks like 1/T.
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 5, 7)) * 3
    d = t - s
    d = d - d.mean(-1, keepdims=True)
    limit = (d**2).sum(-1).mean() / (2 * t.shape[-1])
    errors = []
    with jax.enable_x64(True):
        for temperature in (1e1, 1e2, 1e3):
            got = jol.distill_loss(jnp.asarray(t), jnp.asarray(s), temperature=temperature)
            assert got.dtype == jnp.float64
            errors.append(abs(float(got) - limit) / limit)
    assert errors[0] > errors[1] > errors[2]
    for temperature, err in zip((1e1, 1e2, 1e3), errors):
        assert err < 30 / temperature
    assert errors[2] < 1e-2


# ---------------------------------------------------------------- masks (sequence models)
def _seq(seed=0, b=3, length=5, c=4):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(b, length, c)).astype(np.float32) * 3
    s = rng.normal(size=(b, length, c)).astype(np.float32) * 3
    labels = rng.integers(0, c, (b, length)).astype(np.int32)
    mask = rng.random((b, length)) < 0.6
    mask[0, 0] = True
    return t, s, labels, mask


@pytest.mark.parametrize("alpha", ALPHAS)
def test_masked_loss_is_the_mean_over_valid_tokens(alpha):
    t, s, labels, mask = _seq()
    got = jol.distill_loss(t, s, temperature=2.0, alpha=alpha, labels=labels, mask=mask)
    flat = jol.distill_loss(t[mask], s[mask], temperature=2.0, alpha=alpha, labels=labels[mask])
    np.testing.assert_allclose(got, flat, rtol=1e-6)
    np.testing.assert_allclose(got, np_distill(t, s, 2.0, alpha, labels, mask), rtol=1e-5)


def test_padded_tokens_never_touch_value_or_gradient():
    t, s, labels, mask = _seq(1)
    garbage_t, garbage_s = t.copy(), s.copy()
    garbage_t[~mask] = np.nan
    garbage_s[~mask] = np.inf
    pad_labels = np.where(mask, labels, -100)  # the usual ignore index
    loss = jax.jit(jax.value_and_grad(lambda s_, t_, y: jol.distill_loss(
        t_, s_, temperature=3.0, alpha=0.5, labels=y, mask=mask)))
    v1, g1 = loss(s, t, labels)
    v2, g2 = loss(garbage_s, garbage_t, pad_labels)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    chex.assert_tree_all_finite(g2)
    np.testing.assert_allclose(g2, g1, rtol=1e-6, atol=1e-8)
    assert np.all(np.asarray(g2)[~mask] == 0)


def test_prefix_and_weight_masks():
    t, s, labels, _ = _seq(2)
    rows = np.array([True, False, True])
    got = jol.distill_loss(t, s, temperature=2.0, mask=rows)
    np.testing.assert_allclose(got, jol.distill_loss(t[rows], s[rows], temperature=2.0),
                               rtol=1e-6)
    # Integer weights count a position that many times.
    w = np.array([[2, 1, 0, 1, 1]] * 3)
    rep = np.repeat(np.arange(5), w[0])
    dup = jol.distill_loss(t[:, rep], s[:, rep], temperature=2.0)
    np.testing.assert_allclose(jol.distill_loss(t, s, temperature=2.0, mask=w), dup, rtol=1e-6)


def test_all_masked_gives_zero_and_zero_gradient():
    t, s, labels, _ = _seq(3)
    mask = np.zeros(t.shape[:-1], bool)
    v, g = jax.value_and_grad(lambda s_: jol.distill_loss(
        t, s_, temperature=2.0, alpha=0.5, labels=labels, mask=mask))(jnp.asarray(s))
    assert float(v) == 0.0
    chex.assert_trees_all_equal(g, jnp.zeros_like(g))


# ---------------------------------------------------------------- nasty inputs, dtypes, jit
def test_minus_inf_and_huge_teacher_logits_are_finite():
    t = np.array([[-np.inf, 0.0, 1e4], [-1e4, 1e4, -np.inf]], np.float32)
    s = np.array([[3.0, -2.0, 1.0], [1e4, -1e4, 0.0]], np.float32)
    v, g = jax.value_and_grad(lambda s_: jol.distill_loss(t, s_, temperature=4.0))(
        jnp.asarray(s))
    chex.assert_tree_all_finite((v, g))
    np.testing.assert_allclose(v, np_distill(t, s, 4.0, 1.0), rtol=1e-5)


def test_nan_logits_propagate_instead_of_hiding():
    t = jnp.array([[jnp.nan, 0.0]])
    assert np.isnan(jol.distill_loss(t, jnp.zeros((1, 2)), temperature=2.0))


def test_soft_labels_equal_integer_labels():
    t, s, labels, _ = _seq(4)
    onehot = np.eye(t.shape[-1], dtype=np.float32)[labels]
    a = jol.distill_loss(t, s, temperature=2.0, alpha=0.4, labels=labels)
    b = jol.distill_loss(t, s, temperature=2.0, alpha=0.4, labels=onehot)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bfloat16_is_computed_in_float32():
    t, s, labels, _ = _seq(5)
    got = jol.distill_loss(t.astype(jnp.bfloat16), s.astype(jnp.bfloat16), temperature=2.0)
    assert got.dtype == jnp.float32
    ref = np_distill(np.asarray(t.astype(jnp.bfloat16), np.float32),
                     np.asarray(s.astype(jnp.bfloat16), np.float32), 2.0, 1.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_jit_equals_eager_and_traced_temperature_works():
    t, s, labels, mask = _seq(6)
    kwargs = dict(alpha=0.7, labels=labels, mask=mask)
    eager = jol.distill_loss(t, s, temperature=3.0, **kwargs)
    traced = jax.jit(lambda temp, a: jol.distill_loss(t, s, temperature=temp, alpha=a,
                                                      labels=labels, mask=mask))(3.0, 0.7)
    np.testing.assert_allclose(traced, eager, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jol.distill_loss, static_argnames=("temperature",))(
        t, s, temperature=3.0, **kwargs), eager, rtol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_padded_features_never_touch_value_or_gradient(kind):
    # Garbage (NaN, +-Inf) at masked positions, in the teacher and in the student before
    # the projection: the loss and the gradients of the student and of the projection
    # equal those of clean inputs, and the student's gradient there is exactly zero.
    rng = np.random.default_rng(4)
    t = rng.normal(size=(3, 5, 6)).astype(np.float32)
    s = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = rng.random((3, 5)) < 0.6
    mask[0, 0] = True
    garbage_t, garbage_s = t.copy(), s.copy()
    garbage_t[~mask] = np.nan
    garbage_s[~mask] = -np.inf
    garbage_s[~mask, 0] = np.inf
    proj = jol.distill.init_projection(jax.random.PRNGKey(0), 4, 6)
    loss = jax.jit(jax.value_and_grad(lambda s_, p, t_: jol.feature_distill_loss(
        t_, s_, kind=kind, projection=p, mask=mask), argnums=(0, 1)))
    v1, g1 = loss(s, proj, t)
    v2, g2 = loss(garbage_s, proj, garbage_t)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    chex.assert_tree_all_finite(g2)
    chex.assert_trees_all_close(g2, g1, rtol=1e-6, atol=1e-8)
    assert np.all(np.asarray(g2[0])[~mask] == 0)


@pytest.mark.parametrize(
    "t_shape, s_shape, kwargs, match",
    [
        ((4, 3), (4, 5), {}, "class count"),
        ((4, 3), (2, 3), {}, "shape mismatch"),
        ((4, 3), (4, 3), {"temperature": 0.0}, "temperature"),
        ((4, 3), (4, 3), {"temperature": -1.0}, "temperature"),
        ((4, 3), (4, 3), {"temperature": float("nan")}, "temperature"),
        ((4, 3), (4, 3), {"temperature": float("inf")}, "temperature"),
        ((4, 3), (4, 3), {"temperature": np.ones(2)}, "scalar"),
        ((4, 3), (4, 3), {"alpha": -0.1}, "alpha"),
        ((4, 3), (4, 3), {"alpha": 1.5}, "alpha"),
        ((4, 3), (4, 3), {"alpha": 0.5}, "labels are required"),
        ((4, 3), (4, 3), {"alpha": 0.5, "labels": np.zeros(3, np.int32)}, "labels shape"),
        ((4, 3), (4, 3), {"alpha": 0.5, "labels": np.full(4, 3)}, "out of range"),
        ((4, 3), (4, 3), {"alpha": 0.5, "labels": np.full(4, -1)}, "out of range"),
        ((4, 3), (4, 3), {"alpha": 0.5, "labels": np.zeros((4, 2))}, "soft labels"),
        ((4, 3), (4, 3), {"mask": np.ones(3, bool)}, "mask shape"),
        ((4, 3), (4, 3), {"mask": -np.ones(4)}, "non-negative"),
        ((0, 3), (0, 3), {}, "empty"),
        ((), (), {}, "rank"),
    ],
)
def test_bad_input_raises(t_shape, s_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jol.distill_loss(np.zeros(t_shape, np.float32), np.zeros(s_shape, np.float32), **kwargs)


def test_integer_logits_raise():
    with pytest.raises(ValueError, match="floating"):
        jol.distill_loss(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float32))


# ---------------------------------------------------------------- feature_distill_loss
features = hnp.arrays(np.float32, st.sampled_from([(1, 1), (2, 3), (2, 2, 5)]),
                      elements=st.floats(-1e3, 1e3, width=32))
_feature_loss = jax.jit(jol.feature_distill_loss, static_argnames=("kind",))


@given(features, st.integers(0, 2**31 - 1))
def test_feature_mse_matches_numpy_and_vanishes_on_equal(t, seed):
    s = (t + np.random.default_rng(seed).normal(size=t.shape)).astype(np.float32)
    got = _feature_loss(t, s)
    np.testing.assert_allclose(got, np.mean((s.astype(np.float64) - t) ** 2), rtol=1e-4)
    assert float(_feature_loss(t, t)) == 0.0


@given(features, st.floats(1e-3, 1e3))
def test_feature_cosine_is_scale_free_and_bounded(t, scale):
    # Scale-free only while every nonzero norm stays above the eps floor (1e-8, as torch's
    # cosine_similarity): below it the floor, not the vector, sets the denominator.
    norms = np.linalg.norm(t.astype(np.float64), axis=-1)
    assume(np.all((norms == 0) | (norms * min(scale, 1.0) > 1e-6)))
    s = np.flip(t, -1).copy()
    a = _feature_loss(t, s, kind="cosine")
    b = _feature_loss(t * np.float32(scale), s, kind="cosine")
    assert 0.0 <= float(a) <= 2.0 + 1e-6
    np.testing.assert_allclose(a, b, atol=1e-5)
    nt = np.linalg.norm(t.astype(np.float64), axis=-1)
    ns = np.linalg.norm(s.astype(np.float64), axis=-1)
    cos = np.where(nt * ns > 0, (t.astype(np.float64) * s).sum(-1) / np.maximum(nt * ns, 1e-30),
                   0.0)
    np.testing.assert_allclose(a, np.mean(1 - cos), atol=1e-5)


def test_feature_cosine_zero_vectors_have_finite_gradient():
    t = jnp.zeros((2, 4))
    v, g = jax.value_and_grad(lambda s: jol.feature_distill_loss(t, s, kind="cosine"))(
        jnp.zeros((2, 4)))
    chex.assert_tree_all_finite((v, g))
    assert float(v) == 1.0


def test_feature_projection_mapping_and_callable_agree_and_learn():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    s = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    proj = init_projection(jax.random.PRNGKey(2), 3, 8)
    a = jol.feature_distill_loss(t, s, projection=proj)
    b = jol.feature_distill_loss(t, s, projection=lambda f: project(proj, f))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    g_proj, g_t = jax.jit(jax.grad(
        lambda p, t_: jol.feature_distill_loss(t_, s, projection=p), argnums=(0, 1)))(proj, t)
    assert float(jnp.abs(g_proj["kernel"]).sum()) > 0
    chex.assert_trees_all_equal(g_t, jnp.zeros_like(t))


def test_feature_mask_over_batch_prefix():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)
    rows = np.array([False, True, True])
    for kind in ("mse", "cosine"):
        got = jol.feature_distill_loss(t, s, kind=kind, mask=rows)
        np.testing.assert_allclose(got, jol.feature_distill_loss(t[rows], s[rows], kind=kind),
                                   rtol=1e-6)


@pytest.mark.parametrize(
    "t_shape, s_shape, kwargs, match",
    [
        ((2, 4), (2, 4), {"kind": "l1"}, "kind"),
        ((2, 4), (2, 3), {}, "init_projection"),
        ((2, 4), (3, 4), {}, "shape mismatch"),
        ((2, 4), (2, 3), {"projection": {"kernel": np.zeros((4, 4))}}, "input channels"),
        ((2, 4), (2, 3), {"projection": {"kernel": np.zeros(3)}}, "2-D"),
        ((2, 4), (2, 4), {"mask": np.ones(3)}, "mask shape"),
        ((0, 4), (0, 4), {}, "empty"),
    ],
)
def test_feature_bad_input_raises(t_shape, s_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jol.feature_distill_loss(np.zeros(t_shape, np.float32), np.zeros(s_shape, np.float32),
                                 **kwargs)


# ---------------------------------------------------------------- overflow (issue 7 fuzz)
@pytest.mark.parametrize("t, s, temperature, want", [
    ([[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], 1e20, 0.0),  # T**2 overflows, the KL is 0
    ([[1e36, 0.0]], [[0.0, 1e36]], 1e-3, 1e33),  # t / T overflows: T^2 * (1e36 / T)
    ([[3e38, -3e38]], [[-3e38, 3e38]], 1e-3, 6e35),  # even t - max(t) overflows
    ([[2e35, 0.0]] * 2, [[0.0, 2e35]] * 2, 1e3, 2e38),  # the sum over positions overflows
    ([[3e38, -3e38]], [[-3e38, 3e38]], 1.0, np.inf),  # the true loss 6e38 is beyond float32
])
def test_overflowing_intermediates_still_give_the_true_loss(t, s, temperature, want):
    t, s = jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32)
    np.testing.assert_allclose(float(_loss(t, s, temperature=temperature)), want, rtol=1e-6)
    if np.isfinite(want) and temperature < 1:  # Hinton's gradient T * (p_s - p_t), exactly
        grad = _student_grad(t, s, temperature=temperature)
        np.testing.assert_allclose(grad, [[-temperature, temperature]], rtol=1e-6)


@pytest.mark.parametrize("scale", [1e20, 1e30, 3e38])
def test_feature_cosine_of_huge_features_is_finite_and_scale_free(scale):
    rng = np.random.default_rng(0)
    t, s = rng.uniform(-1, 1, (2, 2, 3)).astype(np.float32), rng.uniform(-1, 1, (2, 2, 3))
    s = s.astype(np.float32)
    want = _feature_loss(t, s, kind="cosine")
    big_t, big_s = t * np.float32(scale), s * np.float32(scale)
    np.testing.assert_allclose(_feature_loss(big_t, big_s, kind="cosine"), want, atol=1e-6)
    np.testing.assert_allclose(_feature_loss(big_t, big_t, kind="cosine"), 0, atol=1e-6)
    assert np.isfinite(np.asarray(_cosine_grad(big_t, big_s))).all()


_cosine_grad = jax.jit(jax.grad(functools.partial(jol.feature_distill_loss, kind="cosine"),
                                argnums=1))
