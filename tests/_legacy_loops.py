"""The training loops as they were before ``train_loop`` replaced them (commit f2c1e03).

Kept verbatim (bar the names they import) so that tests can check that ``fit``,
``train_resumable``, the sweep's run and the hinted distillation step still compute the
same bits as the loops and the step builder they replaced.
"""

import jax
import jax.numpy as jnp
import optax

from jaxopt_lab.app import sweeps
from jaxopt_lab.distill.features import capture_features
from jaxopt_lab.distill.losses import distill_loss, feature_distill_loss
from jaxopt_lab.train import (
    DataPosition,
    HintedParams,
    TrainState,
    batches,
    batches_from,
    create_train_state,
    early_stopping_init,
    early_stopping_update,
    evaluate,
    teacher_outputs,
)
from jaxopt_lab.train.checkpoint import Checkpointer
from jaxopt_lab.train.step import placed_train_step


def legacy_fit(model, data, tx, *, epochs=10, batch_size=64, seed=0, variables=None,
               loss=None, param_transform=None, patience=None, keep="best", mesh=None):
    """``jol.train.fit``'s loop before ``train_loop`` (no ``progress``, no ``step``)."""
    state = create_train_state(model, tx, data.train.x, seed=seed, variables=variables)
    step, put_state, put_batch = placed_train_step(
        model, tx, mesh=mesh, loss=loss, param_transform=param_transform)
    state = put_state(state)
    current_variables = jax.jit(lambda params, model_state: {
        "params": params if param_transform is None else param_transform(params),
        **model_state})
    history = {"train_loss": [], "val_accuracy": []}
    stopper = early_stopping_init("max")
    best = state
    for epoch in range(epochs):
        losses = []
        for x, y in batches(data.train, batch_size, seed=seed, epoch=epoch):
            state, m = step(state, *put_batch(x, y))
            losses.append(m["loss"])
        history["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
        seen = current_variables(state.params, state.model_state)
        val = evaluate(model, seen, data.val, num_classes=data.num_classes)["accuracy"]
        history["val_accuracy"].append(val)
        stopper, improved, stop = early_stopping_update(
            stopper, val, epoch, patience=patience if patience is not None else epochs
        )
        if improved:
            best = state
        if patience is not None and stop:
            break
    history["best_epoch"] = stopper.best_epoch
    history["final_state"] = state
    kept = state if keep == "last" else best
    return {"params": kept.params, **kept.model_state}, history


def legacy_train_resumable(model, data, tx, *, steps, ckpt_dir, save_every, batch_size=64,
                           seed=0, loss=None, param_transform=None, variables=None,
                           mesh=None, max_to_keep=3, stop_after=None):
    """``jol.train.train_resumable``'s loop before ``train_loop``."""
    state = create_train_state(model, tx, data.train.x, seed=seed, variables=variables)
    step_fn, put_state, put_batch = placed_train_step(
        model, tx, mesh=mesh, loss=loss, param_transform=param_transform)
    state = put_state(state)
    with Checkpointer(ckpt_dir, max_to_keep=max_to_keep) as ckpt:
        done, position = 0, DataPosition()
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state, position, done = restored
        stream = batches_from(data.train, batch_size, position, seed=seed)
        budget = steps - done if stop_after is None else min(stop_after, steps - done)
        for _ in range(budget):
            position, x, y = next(stream)
            state, _ = step_fn(state, *put_batch(x, y))
            done += 1
            if done % save_every == 0 or done == steps:
                ckpt.save(done, state, position)
    return state


def legacy_sweep_run(model, data, make_optimizer, *, epochs, batch_size, seed):
    """The sweep's ``training_run`` before ``train_loop``: its own ``lax.scan``."""
    from jaxopt_lab._conv_matmul import convs_as_matmuls
    from jaxopt_lab import sparsity
    from jaxopt_lab.train import make_train_step

    xs, ys = sweeps.epoch_batches(data.train, batch_size, epochs, seed)
    init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(init_key, xs[0, :1])
    val_x, val_y = jnp.asarray(data.val.x), jnp.asarray(data.val.y)
    test_x, test_y = jnp.asarray(data.test.x), jnp.asarray(data.test.y)

    def run(value):
        with convs_as_matmuls():
            tx = make_optimizer(value)
            state = create_train_state(model, tx, xs[0], seed=seed, variables=variables)
            step = make_train_step(model, tx)

            def body(state, batch):
                state, metrics = step(state, *batch)
                return state, metrics["loss"]

            state, losses = jax.lax.scan(body, state, (jnp.asarray(xs), jnp.asarray(ys)))
            trained = {"params": state.params, **state.model_state}

            def accuracy(x, y):
                return jnp.mean(jnp.argmax(model.apply(trained, x, train=False), -1) == y)

            return {"val_accuracy": accuracy(val_x, val_y),
                    "test_accuracy": accuracy(test_x, test_y),
                    "train_loss": losses[-1],
                    "kernel_sparsity": sparsity(state.params).overall}

    return run


def legacy_hinted_distill_step(student, teacher, teacher_variables, tx, *, temperature,
                               alpha, hints, param_transform=None, axis_name=None):
    """``make_distill_step``'s own step with feature hints, before it used
    ``make_train_step``."""
    t_layers = [h.teacher_layer for h in hints]
    s_layers = [h.student_layer for h in hints]

    def loss_fn(params, model_state, x, y, rng):
        p = params.student if param_transform is None else param_transform(params.student)
        mutable = list(model_state)
        result, s_feats = capture_features(
            student, {"params": p, **model_state}, x, layers=s_layers,
            mutable=mutable or False, train=True, rngs={"dropout": rng},
        )
        logits, new_model_state = result if mutable else (result, {})
        t_logits, t_feats = teacher_outputs(teacher, teacher_variables, x, layers=t_layers)
        kd = distill_loss(t_logits, logits, temperature=temperature, alpha=alpha, labels=y)
        hint = sum(
            h.weight * feature_distill_loss(
                t_feats[h.teacher_layer], s_feats[h.student_layer], kind=h.kind,
                projection=params.projection.get(f"hint_{i}"),
            )
            for i, h in enumerate(hints)
        )
        aux = (logits, dict(new_model_state), {"kd_loss": kd, "hint_loss": hint})
        return kd + hint, aux

    def step(state, x, y):
        assert isinstance(state.params, HintedParams)
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (value, (logits, model_state, parts)), grads = grad_fn(
            state.params, state.model_state, x, y, step_rng
        )
        metrics = {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y), **parts}
        if axis_name is not None:
            grads, metrics, model_state = jax.lax.pmean((grads, metrics, model_state), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, model_state, opt_state, rng), metrics

    return step
