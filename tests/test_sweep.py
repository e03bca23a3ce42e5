"""Vmapped sweeps: one compiled program, same results as the configurations one by one."""

import math
from fractions import Fraction
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_lab as jol
from _legacy_loops import legacy_sweep_run
from jaxopt_lab.app.cli import main
from jaxopt_lab.app.sweeps import (
    epoch_batches,
    format_table,
    sparsity_optimizer,
    sweep_student,
    training_run,
)

DATA = jol.app.load_digits()
MLP = jol.app.MLP(hidden=(16,))


def test_epoch_batches_are_fits_batches():
    xs, ys = epoch_batches(DATA.train, 64, 2, seed=3)
    want = [b for e in range(2) for b in jol.train.batches(DATA.train, 64, seed=3, epoch=e)]
    assert xs.shape == (len(want), 64, 8, 8, 1) and ys.shape == (len(want), 64)
    np.testing.assert_array_equal(xs[-1], want[-1][0])
    np.testing.assert_array_equal(ys[0], want[0][1])
    with pytest.raises(ValueError, match="exceeds"):
        epoch_batches(DATA.train, 10_000, 1, seed=0)


def test_vmapped_sweep_equals_each_configuration_alone():
    lrs, traces = [1e-3, 1e-2, 3e-2], []

    def make(lr):
        traces.append(1)
        return optax.adam(lr)

    rows = jol.app.sweep(MLP, DATA, make, lrs, epochs=1, name="learning_rate")
    assert len(traces) == 1  # vmap traces one configuration for all values
    assert [r["learning_rate"] for r in rows] == pytest.approx(lrs)
    run = jax.jit(training_run(MLP, DATA, lambda lr: optax.adam(lr), epochs=1, batch_size=64,
                               seed=0))
    for row, lr in zip(rows, lrs):
        alone = run(jnp.float32(lr))
        assert row["val_accuracy"] == pytest.approx(float(alone["val_accuracy"]),
                                                    abs=1 / len(DATA.val.y) + 1e-6)
        assert row["train_loss"] == pytest.approx(float(alone["train_loss"]), rel=1e-3, abs=1e-4)
    assert all(0 <= r["val_accuracy"] <= 1 for r in rows)
    chosen = [r for r in rows if r["selected"]]
    assert len(chosen) == 1 and [r for r in rows if "test_accuracy" in r] == chosen
    assert chosen[0]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert all(r["kernel_sparsity"] == pytest.approx(0, abs=1e-6) for r in rows)


def test_sparsity_sweep_reaches_each_target():
    targets = [0.0, 0.5, 0.9]
    make = sparsity_optimizer(learning_rate=1e-3, end_step=10)
    rows = jol.app.sweep(MLP, DATA, make, targets, epochs=1, name="sparsity")
    sizes = [x.size for x in jax.tree.leaves(MLP.init(jax.random.PRNGKey(0), DATA.train.x[:1]))
             if x.ndim >= 2]
    for row, target in zip(rows, targets):
        # magnitude_mask prunes floor(float32(target) * size) per kernel (0.9 of 160: 143)
        pruned = sum(math.floor(Fraction(float(np.float32(target))) * n) for n in sizes)
        assert row["kernel_sparsity"] == pytest.approx(pruned / sum(sizes), abs=1e-6)


def test_sweep_command_trains_the_student(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["sweep", "--param", "learning_rate", "--values", "0.001,0.003",
                 "--epochs", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.001, 0.003])
    assert all(r["val_accuracy"] > 0.3 for r in rows)  # the student learns in one epoch
    assert sum("test_accuracy" in r for r in rows) == 1
    assert format_table(rows) in capsys.readouterr().out


@pytest.mark.parametrize("values", [[], [[0.1]], [float("nan")], [0.1, float("inf")]])
def test_bad_values(values):
    with pytest.raises(ValueError, match="values"):
        jol.app.sweep(MLP, DATA, lambda lr: optax.sgd(lr), values, epochs=1)


def test_bad_settings():
    with pytest.raises(ValueError, match="epochs"):
        jol.app.sweep(MLP, DATA, lambda lr: optax.sgd(lr), [0.1], epochs=0)
    with pytest.raises(ValueError, match="clashes"):
        jol.app.sweep(MLP, DATA, lambda lr: optax.sgd(lr), [0.1], name="val_accuracy")
    with pytest.raises(ValueError, match="param"):
        sweep_student(param="momentum")


def test_format_table():
    rows = [{"lr": 0.001, "val_accuracy": 0.5, "train_loss": 1.0, "selected": False},
            {"lr": 0.01, "val_accuracy": 0.7, "train_loss": 0.5, "selected": True,
             "test_accuracy": 0.65}]
    table = format_table(rows)
    assert table.splitlines()[0] == "| lr | val_accuracy | train_loss | selected | test_accuracy |"
    assert "| 0.001 | 0.5000 | 1.0000 |  | - |" in table
    assert "| 0.01 | 0.7000 | 0.5000 | yes | 0.6500 |" in table
    assert format_table([]) == ""
    chex.assert_equal(len(table.splitlines()), 4)


@pytest.mark.parametrize("arg, bad", [
    ("model", "not a model"), ("model", jol.app.NNXMLP), ("data", DATA.train),
    ("data", (DATA.train.x, DATA.train.y)), ("make_optimizer", optax.sgd(0.1)),
    ("epochs", 1.5), ("epochs", "2"), ("batch_size", 2.5), ("seed", None), ("name", 3),
])
def test_bad_types_raise_type_error_naming_the_argument(arg, bad):
    """Wrong types fail fast with a TypeError naming the argument (was AttributeError)."""
    kw = dict(model=MLP, data=DATA, make_optimizer=lambda lr: optax.sgd(lr), epochs=1,
              batch_size=4, seed=0, name="lr")
    kw[arg] = bad
    with pytest.raises(TypeError, match=arg):
        jol.app.sweep(kw.pop("model"), kw.pop("data"), kw.pop("make_optimizer"), [0.1], **kw)
    with pytest.raises(ValueError, match="batch_size"):
        jol.app.sweep(MLP, DATA, lambda lr: optax.sgd(lr), [0.1], batch_size=0)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_sweep_run_is_bit_identical_to_the_scan_it_replaced(which):
    # The sweep's run now goes through jol.train.train_loop(scan=True).
    if which == "mlp":
        model, data, make = MLP, DATA, lambda lr: optax.adam(lr)
        values = jnp.asarray([1e-3, 3e-3], jnp.float32)
    else:  # convolutions, run as matmuls inside the sweep; a pruning optimizer
        model = jol.app.StudentCNN(num_classes=10)
        data = DATA._replace(train=DATA.train._replace(x=DATA.train.x[:192],
                                                       y=DATA.train.y[:192]),
                             val=DATA.val._replace(x=DATA.val.x[:64], y=DATA.val.y[:64]),
                             test=DATA.test._replace(x=DATA.test.x[:64], y=DATA.test.y[:64]))
        make = sparsity_optimizer(learning_rate=2e-3, end_step=2)
        values = jnp.asarray([0.0, 0.5], jnp.float32)
    kwargs = dict(epochs=2, batch_size=64, seed=1)
    got = jax.jit(jax.vmap(training_run(model, data, make, **kwargs)))(values)
    want = jax.jit(jax.vmap(legacy_sweep_run(model, data, make, **kwargs)))(values)
    chex.assert_trees_all_equal(got, want)
