"""fit / evaluate / early stopping; the reference models reach their accuracy targets."""

import functools

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxopt_lab as jol
from jaxopt_lab import app as A
from jaxopt_lab import train as T


@functools.lru_cache(maxsize=None)
def _digits():
    return A.load_digits(seed=0)


@given(metrics=st.lists(st.floats(0, 1), min_size=1, max_size=30), patience=st.integers(0, 4),
       mode=st.sampled_from(["max", "min"]))
def test_early_stopping_matches_a_reference_loop(metrics, patience, mode):
    state = T.early_stopping_init(mode)
    best, best_epoch, bad = None, -1, 0
    for epoch, m in enumerate(metrics):
        state, improved, stop = T.early_stopping_update(state, m, epoch, patience=patience,
                                                        mode=mode)
        better = best is None or (m > best if mode == "max" else m < best)
        if better:
            best, best_epoch, bad = m, epoch, 0
        else:
            bad += 1
        assert improved == better
        assert stop == (bad > patience)
        assert state.best == best and state.best_epoch == best_epoch
        if stop:
            break


def test_early_stopping_bad_input():
    s = T.early_stopping_init()
    with pytest.raises(ValueError, match="patience"):
        T.early_stopping_update(s, 0.5, 0, patience=-1)
    with pytest.raises(ValueError, match="not finite"):
        T.early_stopping_update(s, float("nan"), 0, patience=1)
    with pytest.raises(ValueError, match="mode"):
        T.early_stopping_init("median")


def test_teacher_reaches_97_percent_and_student_is_a_quarter_of_its_size():
    d = _digits()
    teacher, student = A.TeacherCNN(), A.StudentCNN()
    variables, history = T.fit(teacher, d, optax.adam(2e-3), epochs=8, patience=3)
    result = T.evaluate(teacher, variables, d.test)
    assert result["accuracy"] >= 0.97, result
    assert 0.9 <= result["f1_macro"] <= 1 and np.isfinite(result["loss"])
    assert len(history["val_accuracy"]) <= 8 and 0 <= history["best_epoch"] < 8
    n_t = A.param_count(variables["params"])
    n_s = A.param_count(A.init_model(student, d.train.x)["params"])
    assert n_s * 4 <= n_t, (n_s, n_t)
    # The best weights (not the last) are returned: re-evaluating val gives the best value.
    val = T.evaluate(teacher, variables, d.val)["accuracy"]
    assert val == pytest.approx(max(history["val_accuracy"]))


def test_fit_with_l1_and_an_optax_schedule_trains_the_mlp():
    d = _digits()
    lr = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 5, 100)
    tx = optax.chain(T.add_l1(1e-5), T.add_l2(1e-4), optax.adam(lr))
    variables, _ = T.fit(A.MLP(hidden=(64,)), d, tx, epochs=4)
    assert T.evaluate(A.MLP(hidden=(64,)), variables, d.test)["accuracy"] > 0.9


def test_tree_transforms_work_on_nnx_state():
    model = A.NNXMLP(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = _digits().test.x[:32]
    want = np.asarray(model(x))
    q = jol.dequantize(jol.quantize(params, bits=8))
    got = np.asarray(nnx.merge(graphdef, q, rest)(x))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    mask = jol.magnitude_mask(params, 0.5)
    pruned = jol.apply_mask(params, mask)
    kernels = [leaf for leaf in jax.tree.leaves(pruned) if leaf.ndim == 2]
    assert len(kernels) == 2 and all(int((k == 0).sum()) == k.size // 2 for k in kernels)
    out = nnx.merge(graphdef, pruned, rest)(x)
    assert np.isfinite(np.asarray(out)).all()


def test_fit_rejects_bad_settings():
    with pytest.raises(ValueError, match="epochs"):
        T.fit(A.MLP(), _digits(), optax.sgd(0.1), epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        T.fit(A.MLP(), _digits(), optax.sgd(0.1), epochs=1, batch_size=100_000)


def test_fit_keep_last_returns_the_final_state_and_validates_keep_and_mesh():
    d = _digits()
    model = A.MLP(hidden=(16,))
    last, history = T.fit(model, d, optax.sgd(0.05), epochs=2, keep="last")
    final = history["final_state"]
    chex.assert_trees_all_equal(last["params"], final.params)
    with pytest.raises(ValueError, match="keep"):
        T.fit(model, d, optax.sgd(0.1), epochs=1, keep="first")
    grid = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    with pytest.raises(ValueError, match="1-D"):
        T.fit(model, d, optax.sgd(0.1), epochs=1, mesh=grid)


def test_a_shared_step_gives_the_run_fit_builds():
    # fit(step=...) runs the same loop on a caller's step: one jitted step with the
    # learning rate as an argument serves several runs, each equal to its own fit.
    data = _digits()
    model = A.MLP(hidden=(16,))

    @jax.jit
    def step(state, x, y, lr):
        return T.make_train_step(model, optax.sgd(lr))(state, x, y)

    for lr in (0.05, 0.2):
        want, hist_want = T.fit(model, data, optax.sgd(lr), epochs=2, batch_size=128)
        got, hist_got = T.fit(model, data, optax.sgd(lr), epochs=2, batch_size=128,
                              step=functools.partial(step, lr=np.float32(lr)))
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
        assert hist_got["val_accuracy"] == hist_want["val_accuracy"]
    assert step._cache_size() == 1


def test_step_and_mesh_are_exclusive():
    with pytest.raises(ValueError, match="step= or mesh="):
        T.fit(A.MLP(hidden=(8,)), _digits(), optax.sgd(0.1), epochs=1,
              step=lambda s, x, y: (s, {}), mesh=T.data_mesh(1))


def test_fit_reuses_the_compiled_step_of_an_earlier_run():
    data, model, tx = _digits(), A.MLP(hidden=(8,)), optax.sgd(0.1)
    T.fit(model, data, tx, epochs=1, batch_size=256)
    step, _, _ = T.step.placed_train_step(model, tx)
    before = step._cache_size()
    T.fit(model, data, tx, epochs=1, batch_size=256, seed=1)
    assert step._cache_size() == before
