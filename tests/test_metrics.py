"""The public surface of jaxopt_lab.metrics: names, sklearn argument order, runnable docs."""

import doctest
import inspect
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxopt_lab as jol
from jaxopt_lab import metrics as M
from jaxopt_lab.metrics import classification, ranking, regression

NAMES = ("accuracy", "precision", "recall", "f1", "roc_auc", "mae", "mape", "rmse", "pearson")


def test_every_metric_is_exported_with_sklearn_argument_order():
    assert jol.metrics is M
    assert sorted(M.__all__) == sorted(NAMES) and list(M.__all__) == sorted(M.__all__)
    for name in NAMES:
        params = list(inspect.signature(getattr(M, name)).parameters.values())
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert len(positional) == 2, name
        assert all(p.kind is p.KEYWORD_ONLY for p in params[2:]), name
        if name != "pearson":
            assert positional[0] == "y_true", name


@pytest.mark.parametrize("module", [classification, ranking, regression])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_jax_arrays_of_a_float_dtype(name):
    fn = getattr(M, name)
    if name == "roc_auc":
        out = fn([0, 1, 1, 0], [0.2, 0.9, 0.4, 0.5])
    elif name in ("accuracy", "precision", "recall", "f1"):
        out = fn(np.array([0, 1, 1, 0]), jnp.array([0, 1, 0, 0]))
    else:
        out = fn([1.0, 2.0, 3.0, 5.0], [1.5, 2.0, 2.5, 6.0])
    assert isinstance(out, jnp.ndarray) and out.shape == ()
    assert jnp.issubdtype(out.dtype, jnp.floating)


def test_vmap_equals_a_loop():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, (4, 16)), rng.integers(0, 3, (4, 16))
    f1 = partial(M.f1, average="macro", num_classes=3)
    np.testing.assert_allclose(jax.vmap(f1)(y_true, y_pred),
                               [f1(t, p) for t, p in zip(y_true, y_pred)], rtol=1e-6)
    scores = rng.normal(size=(4, 16))
    binary = y_true % 2
    np.testing.assert_allclose(jax.vmap(M.roc_auc)(binary, scores),
                               [M.roc_auc(t, s) for t, s in zip(binary, scores)], rtol=1e-6)


def test_sharded_batch_gives_the_single_device_value():
    """NamedSharding under jit needs nothing; shard_map needs axis_name to sum statistics."""
    rng = np.random.default_rng(1)
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    sharded = NamedSharding(mesh, P("d"))
    n = 4 * jax.device_count()
    y_true, y_pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
    x, y = rng.normal(size=n), rng.normal(size=n)
    cases = [
        (partial(M.f1, average="macro", num_classes=3), y_true, y_pred),
        (M.accuracy, y_true, y_pred),
        (M.rmse, x, y),
        (M.pearson, x, y),
    ]
    for fn, a, b in cases:
        expected = fn(a, b)
        a_sh, b_sh = jax.device_put(a, sharded), jax.device_put(b, sharded)
        np.testing.assert_allclose(jax.jit(fn)(a_sh, b_sh), expected, rtol=1e-5)
        per_shard = jax.shard_map(partial(fn, axis_name="d"), mesh=mesh,
                                  in_specs=(P("d"), P("d")), out_specs=P())
        np.testing.assert_allclose(jax.jit(per_shard)(a_sh, b_sh), expected, rtol=1e-5)
