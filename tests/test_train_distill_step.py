"""The distillation step: equals the manual KD update, composes with prune and fake_quant,
and gives the same result under jit on one device and pmap over 8."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxopt_lab as jol
from _legacy_loops import legacy_hinted_distill_step
from jaxopt_lab.train import (
    FeatureHint,
    HintedParams,
    create_distill_state,
    kd_loss,
    make_distill_step,
    student_variables,
)
from jaxopt_lab.app import MLP
from jaxopt_lab.train import create_train_state, make_train_step

T, ALPHA = 3.0, 0.7
N_DEV = 8
HINT = FeatureHint("Dense_0", "Dense_0", weight=0.5)
HAS_PRUNE = hasattr(jol, "prune") and hasattr(jol, "magnitude_mask")


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, n).astype(
        np.int32)


X, Y = _batch()
MLP_TEACHER, MLP_STUDENT = MLP(hidden=(32,)), MLP(hidden=(8,))
# Jitted inits: eager init of a conv net dispatches op by op and takes seconds.
MLP_T_VARS = jax.jit(MLP_TEACHER.init)(jax.random.PRNGKey(1), X[:1])
MLP_S_VARS = jax.jit(MLP_STUDENT.init)(jax.random.PRNGKey(0), X[:1])
TX = optax.adam(1e-2)


def _mlp_step(hints=(), **kwargs):
    return make_distill_step(MLP_STUDENT, MLP_TEACHER, MLP_T_VARS, TX, temperature=T,
                             alpha=ALPHA, hints=hints, **kwargs)


def _mlp_state(hints=()):
    return create_distill_state(MLP_STUDENT, TX, X, teacher=MLP_TEACHER,
                                teacher_variables=MLP_T_VARS, hints=hints,
                                variables=MLP_S_VARS)


# Compiled once, shared by the tests below (compilation dominates their cost).
KD_STEP = jax.jit(chex.assert_max_traces(_mlp_step(), n=1))
HINT_STEP = jax.jit(chex.assert_max_traces(_mlp_step((HINT,)), n=1))


class DenseBN(nn.Module):
    """A tiny student with BatchNorm (cheaper to compile than a conv net)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x)


def test_step_equals_manual_kd_update_with_batchnorm():
    # SGD: the bias before a BatchNorm has an exactly-zero true gradient, which Adam would
    # blow up from rounding noise to full-size steps.
    teacher, student, sgd = MLP_TEACHER, DenseBN(), optax.sgd(0.1)
    t_vars = MLP_T_VARS
    state = create_distill_state(student, sgd, X,
                                 variables=jax.jit(student.init)(jax.random.PRNGKey(0), X[:1]))
    step = jax.jit(make_distill_step(student, teacher, t_vars, sgd, temperature=T, alpha=ALPHA))
    new, metrics = step(state, X, Y)

    @jax.jit
    def manual(state):
        t_logits = teacher.apply(t_vars, X, train=False)  # inference mode: running statistics

        def loss(p):
            out, upd = student.apply({"params": p, **state.model_state}, X, train=True,
                                     mutable=["batch_stats"])
            return jol.distill_loss(t_logits, out, temperature=T, alpha=ALPHA, labels=Y), upd

        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        updates, _ = sgd.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), upd, value

    params, upd, value = manual(state)
    chex.assert_trees_all_close(new.params, params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(new.model_state, dict(upd), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    assert int(new.step) == 1


def test_alpha_zero_is_the_plain_cross_entropy_step():
    state = _mlp_state()
    kd = make_distill_step(MLP_STUDENT, MLP_TEACHER, MLP_T_VARS, TX, temperature=T, alpha=0.0)
    plain = make_train_step(MLP_STUDENT, TX)
    a, ma = jax.jit(kd)(state, X, Y)
    b, mb = jax.jit(plain)(state, X, Y)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)


def test_kd_loss_plugs_into_the_train_step_and_checks_settings():
    loss = kd_loss(MLP_TEACHER, MLP_T_VARS, temperature=T, alpha=ALPHA)
    logits = MLP_STUDENT.apply({"params": _mlp_state().params}, X)
    want = jol.distill_loss(MLP_TEACHER.apply(MLP_T_VARS, X), logits, temperature=T,
                            alpha=ALPHA, labels=Y)
    np.testing.assert_allclose(loss(logits, Y, X), want, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(MLP_TEACHER, MLP_T_VARS, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        make_distill_step(MLP_STUDENT, MLP_TEACHER, MLP_T_VARS, TX, alpha=2.0)


def test_step_traces_once():
    state = _mlp_state()
    for seed in range(3):
        state, _ = KD_STEP(state, *_batch(seed=seed))
    assert int(state.step) == 3


def test_hints_train_the_projection_and_add_their_loss():
    state = _mlp_state((HINT,))
    assert isinstance(state.params, HintedParams)
    assert state.params.projection["hint_0"]["kernel"].shape == (8, 32)  # 8 -> 32 wide
    new, metrics = HINT_STEP(state, X, Y)
    _, plain = KD_STEP(_mlp_state(), X, Y)
    np.testing.assert_allclose(metrics["kd_loss"], plain["loss"], rtol=1e-5)
    assert float(metrics["hint_loss"]) > 0
    np.testing.assert_allclose(metrics["loss"], metrics["kd_loss"] + metrics["hint_loss"],
                               rtol=1e-6)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
    assert all(jax.tree.leaves(moved))
    chex.assert_trees_all_equal(student_variables(new), {"params": new.params.student})


def test_hint_errors():
    with pytest.raises(ValueError, match="kind"):
        _mlp_step((HINT._replace(kind="l1"),))
    with pytest.raises(ValueError, match="teacher"):
        create_distill_state(MLP_STUDENT, TX, X, hints=(HINT,))
    with pytest.raises(ValueError, match="create_distill_state"):
        _mlp_step((HINT,))(_mlp_state(), X, Y)
    with pytest.raises(ValueError, match="known layers"):
        _mlp_state((HINT._replace(student_layer="Conv_9"),))


def test_pmap_equals_single_device():
    # The logits-only path is the foundation's step (tested there, and under pmap below).
    hints = (HINT,)
    state = _mlp_state(hints)
    single = HINT_STEP
    multi = jax.pmap(_mlp_step(hints, axis_name="batch"), axis_name="batch")
    rstate = jol.train.replicate(state)
    xs, ys = (jol.train.shard_batch_for_pmap(a, N_DEV) for a in (X, Y))
    for _ in range(2):
        state, m1 = single(state, X, Y)
        rstate, m2 = multi(rstate, xs, ys)
    chex.assert_trees_all_close(jol.train.unreplicate(rstate).params, state.params,
                                rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m2["loss"][0], m1["loss"], rtol=1e-5)


def test_mesh_sharded_jit_equals_single_device():
    mesh = jol.train.data_mesh(N_DEV)
    replicated = NamedSharding(mesh, P())
    batched = NamedSharding(mesh, P("data"))
    sharded = jax.jit(_mlp_step((HINT,)), in_shardings=(replicated, batched, batched),
                      out_shardings=(replicated, replicated))
    state = _mlp_state((HINT,))
    a, ma = HINT_STEP(state, X, Y)
    b, mb = sharded(jax.device_put(state, replicated), *jax.device_put((X, Y), batched))
    chex.assert_trees_all_close(b.params, a.params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_prune_and_fake_quant_in_the_same_step(parallel):
    if not HAS_PRUNE:
        pytest.skip("jol.prune is not available yet")
    axis = "batch" if parallel == "pmap" else None
    prune = jol.prune(jol.magnitude_mask, jol.constant_schedule(0.5), axis_name=axis)
    tx = optax.chain(optax.adam(1e-2), prune)
    quant = lambda p: jol.fake_quant(p, bits=4)  # noqa: E731
    step = make_distill_step(MLP_STUDENT, MLP_TEACHER, MLP_T_VARS, tx, temperature=T,
                             alpha=ALPHA, param_transform=quant, axis_name=axis)
    state = create_train_state(MLP_STUDENT, tx, X, variables=MLP_S_VARS)
    if parallel == "pmap":
        step, state = jax.pmap(step, axis_name=axis), jol.train.replicate(state)
        batch = tuple(jol.train.shard_batch_for_pmap(a, N_DEV) for a in (X, Y))
    else:
        step, batch = jax.jit(step), (X, Y)
    for _ in range(3):
        before = state
        state, metrics = step(state, *batch)
    if parallel == "pmap":
        state, metrics = jol.train.unreplicate((state, metrics))
    else:
        # The loss is computed on the fake-quantized student (the last step's start point).
        @jax.jit
        def losses(params):
            t_logits = MLP_TEACHER.apply(MLP_T_VARS, X)
            return [jol.distill_loss(t_logits, MLP_STUDENT.apply({"params": p}, X),
                                     temperature=T, alpha=ALPHA, labels=Y)
                    for p in (quant(params), params)]

        quantized, full = losses(before.params)
        np.testing.assert_allclose(metrics["loss"], quantized, rtol=1e-5)
        assert abs(float(quantized) - float(full)) > 1e-6
    chex.assert_tree_all_finite(metrics)
    masks = state.opt_state[1].masks
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    for (path, kernel), mask in zip(leaves, jax.tree.leaves(masks), strict=True):
        if kernel.ndim < 2:
            continue
        kernel, mask = np.asarray(kernel), np.asarray(mask)
        assert abs(1 - mask.mean() - 0.5) <= 1 / mask.size, jax.tree_util.keystr(path)
        assert np.all(kernel[~mask] == 0), jax.tree_util.keystr(path)
        # ... and the fake-quantized forward pass keeps them at zero.
        assert np.all(np.asarray(quant(kernel))[~mask] == 0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_hinted_step_is_bit_identical_to_the_step_it_replaced(parallel):
    # With hints, make_distill_step now plugs its objective into make_train_step instead
    # of building its own step: same bits as the old step, on one device and under pmap.
    axis = "batch" if parallel == "pmap" else None
    hints = (HINT, FeatureHint("Dense_0", "Dense_0", kind="cosine"))
    new = _mlp_step(hints, axis_name=axis)
    old = legacy_hinted_distill_step(MLP_STUDENT, MLP_TEACHER, MLP_T_VARS, TX, temperature=T,
                                     alpha=ALPHA, hints=hints, axis_name=axis)
    state = _mlp_state(hints)
    batch = (X, Y)
    if parallel == "pmap":
        new, old = (jax.pmap(f, axis_name=axis) for f in (new, old))
        state = jol.train.replicate(state)
        batch = tuple(jol.train.shard_batch_for_pmap(a, N_DEV) for a in batch)
    else:
        new, old = jax.jit(new), jax.jit(old)
    got = want = state
    for _ in range(2):
        got, m_got = new(got, *batch)
        want, m_want = old(want, *batch)
        chex.assert_trees_all_equal((got, m_got), (want, m_want))
