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
from _legacy_loops import legacy_fit
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


# --- train_loop: the one loop behind fit, train_resumable and the sweep ---------------------


def _counting_step(state, b):
    return state + b, {"b": b}


@given(sizes=st.lists(st.integers(0, 5), max_size=5),
       max_steps=st.none() | st.integers(0, 20),
       stop_step=st.none() | st.integers(1, 20),
       stop_epoch=st.none() | st.integers(0, 5))
def test_train_loop_runs_each_batch_once_calls_hooks_and_draws_nothing_extra(
        sizes, max_steps, stop_step, stop_epoch):
    drawn, epoch_calls, step_calls = [], [], []

    def epoch_batches(e, n):
        for i in range(n):
            drawn.append((e, i))
            yield (10 * e + i,)

    def after_step(state, m, batch, done):
        step_calls.append((done, batch[0], m["b"]))
        return done == stop_step

    def after_epoch(epoch, state, metrics):
        epoch_calls.append((epoch, [m["b"] for m in metrics]))
        return epoch == stop_epoch

    epochs = (epoch_batches(e, n) for e, n in enumerate(sizes))
    state, last = T.train_loop(_counting_step, 0, epochs, max_steps=max_steps,
                               after_step=after_step, after_epoch=after_epoch)
    # The reference: the same loop written out with every stopping rule.
    want_steps, want_epochs, ran = [], [], 0
    for e, n in enumerate(sizes):
        if max_steps is not None and ran >= max_steps:
            break
        batch_values, cut = [], False
        for i in range(n):
            ran += 1
            batch_values.append(10 * e + i)
            want_steps.append((ran, 10 * e + i, 10 * e + i))
            if ran == stop_step or (max_steps is not None and ran >= max_steps):
                cut = True
                break
        if cut:
            break
        want_epochs.append((e, batch_values))
        if e == stop_epoch:
            break
    assert step_calls == want_steps
    assert epoch_calls == want_epochs
    assert len(drawn) == len(want_steps)  # no batch drawn beyond a stop
    assert state == sum(v for _, v, _ in want_steps)
    assert last == ({"b": want_steps[-1][1]} if want_steps else None)


def test_train_loop_scan_mode_matches_the_python_loop():
    d, model, tx = _digits(), A.MLP(hidden=(8,)), optax.adam(1e-2)
    state = T.create_train_state(model, tx, d.train.x)
    step = T.make_train_step(model, tx)
    xs = np.stack([x for x, _ in T.batches(d.train, 128, epoch=0)])[:3]
    ys = np.stack([y for _, y in T.batches(d.train, 128, epoch=0)])[:3]
    scanned, metrics = jax.jit(lambda s: T.train_loop(step, s, (xs, ys), scan=True))(state)
    looped, last = T.train_loop(jax.jit(step), state, [zip(xs, ys)])
    assert metrics["loss"].shape == (3,) and int(scanned.step) == 3
    chex.assert_trees_all_close(scanned, looped, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda m: m[-1], metrics), last, rtol=1e-5)


def test_train_loop_bad_arguments():
    with pytest.raises(ValueError, match="max_steps"):
        T.train_loop(_counting_step, 0, [[(1,)]], max_steps=-1)
    for bad in ({"max_steps": 1}, {"after_step": print}, {"after_epoch": print},
                {"step_args": tuple}):
        with pytest.raises(ValueError, match="scan=True"):
            T.train_loop(_counting_step, 0, (np.ones(3),), scan=True, **bad)


@pytest.mark.parametrize("settings", [
    {"epochs": 3, "batch_size": 128, "seed": 1, "patience": 0},
    {"epochs": 2, "batch_size": 64, "seed": 2, "keep": "last",
     "param_transform": functools.partial(jol.fake_quant, bits=4)},
    {"epochs": 2, "batch_size": 128, "mesh": 2},
], ids=["early_stop", "qat_keep_last", "mesh"])
def test_fit_is_bit_identical_to_the_loop_it_replaced(settings):
    if "mesh" in settings:
        settings = {**settings, "mesh": T.data_mesh(settings["mesh"])}
    d, model = _digits(), A.MLP(hidden=(16,))
    got, hist_got = T.fit(model, d, optax.adam(3e-3), **settings)
    want, hist_want = legacy_fit(model, d, optax.adam(3e-3), **settings)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(hist_got.pop("final_state"), hist_want.pop("final_state"))
    assert hist_got == hist_want
