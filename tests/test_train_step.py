"""The train step agrees across jit, pmap over a named axis, and jit on a device mesh."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_lab import app as A

from jaxopt_lab import train as T


@functools.lru_cache(maxsize=None)
def _digits():
    return A.load_digits(seed=0)


def _batches(n_steps=3, bs=64):
    d = _digits()
    return [(d.train.x[i * bs : (i + 1) * bs], d.train.y[i * bs : (i + 1) * bs])
            for i in range(n_steps)]


def _run_three_ways(model, tx, *, param_transform=None):
    d = _digits()
    s0 = T.create_train_state(model, tx, d.train.x, seed=0)
    kw = {"param_transform": param_transform}
    jit_step = T.jit_train_step(model, tx, **kw)
    pm_step = T.pmap_train_step(model.clone(axis_name="batch") if hasattr(model, "axis_name")
                                else model, tx, **kw)
    mesh_step, put_state, put_batch = T.mesh_train_step(model, tx, T.data_mesh(8), **kw)
    s_jit, s_pm, s_mesh = s0, T.replicate(s0), put_state(s0)
    for x, y in _batches():
        s_jit, m_jit = jit_step(s_jit, x, y)
        s_pm, m_pm = pm_step(s_pm, T.shard_batch_for_pmap(x, 8), T.shard_batch_for_pmap(y, 8))
        s_mesh, m_mesh = mesh_step(s_mesh, *put_batch(x, y))
        chex.assert_trees_all_close(m_jit, T.unreplicate(m_pm), atol=1e-5)
        chex.assert_trees_all_close(m_jit, m_mesh, atol=1e-5)
    return s_jit, T.unreplicate(s_pm), s_mesh


@pytest.mark.parametrize("model", [A.TeacherCNN(features=(8, 16, 16), hidden=32), A.MLP(hidden=(32,))],
                         ids=["teacher_bn", "mlp"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_jit_pmap_mesh_give_same_params(model, opt):
    assert jax.device_count() == 8
    tx = optax.sgd(0.1, momentum=0.9) if opt == "sgd" else optax.adamw(1e-2, weight_decay=1e-3)
    s_jit, s_pm, s_mesh = _run_three_ways(model, tx)
    # Adam divides by sqrt(v): where a gradient is ~0, its summation-order noise (the
    # all-reduce adds in another order) moves that weight by up to a fraction of the
    # learning rate; measured up to 1.2e-5 here.
    tol = 1e-5 if opt == "sgd" else 5e-5
    for other in (s_pm, s_mesh):
        chex.assert_trees_all_close(s_jit.params, other.params, atol=tol, rtol=1e-5)
        chex.assert_trees_all_close(s_jit.model_state, other.model_state, atol=tol, rtol=1e-5)
        chex.assert_trees_all_close(s_jit.opt_state, other.opt_state, atol=tol, rtol=1e-5)
        assert int(other.step) == 3
    # Training actually moved the weights and (for the BN model) the running statistics.
    s0 = T.create_train_state(model, tx, _digits().train.x, seed=0)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s0.params, s_jit.params)
    assert min(jax.tree.leaves(moved)) > 0


def test_param_transform_is_applied_inside_the_loss():
    model, tx = A.MLP(hidden=(16,)), optax.sgd(0.1)
    d = _digits()
    s0 = T.create_train_state(model, tx, d.train.x)
    x, y = _batches(1)[0]
    zero = jax.jit(T.make_train_step(model, tx, param_transform=lambda p: jax.tree.map(
        jnp.zeros_like, p)))
    _, m = zero(s0, x, y)
    np.testing.assert_allclose(float(m["loss"]), np.log(10), rtol=1e-5)
    # Same transform on all three paths.
    half = lambda p: jax.tree.map(lambda a: 0.5 * a, p)
    s_jit, s_pm, s_mesh = _run_three_ways(model, tx, param_transform=half)
    chex.assert_trees_all_close(s_jit.params, s_pm.params, s_mesh.params, atol=1e-5)


def test_bad_global_batch_for_devices():
    with pytest.raises(ValueError, match="not divisible"):
        T.shard_batch_for_pmap(np.zeros((10, 3)), 8)
    model, tx = A.MLP(hidden=(8,)), optax.sgd(0.1)
    _, _, put_batch = T.mesh_train_step(model, tx, T.data_mesh(8))
    with pytest.raises(ValueError, match="not divisible"):
        put_batch(np.zeros((10, 64), np.float32), np.zeros(10, np.int32))
