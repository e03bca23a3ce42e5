"""report/variants.py: each variant's deployed path computes what its evaluation sees, the
stored tree survives save/load, and the helpers select, store and schedule as they say.

Variants that train (QAT, pruning, KD, compaction) are covered end to end by the quick job
(tests/test_cli.py); here a stand-in context holds an initialised teacher with random
BatchNorm statistics.
"""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_lab as jol
from jaxopt_lab.app.report import variants as V
from jaxopt_lab.app.models import TeacherCNN

X = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))


@functools.cache
def _ctx():
    model = TeacherCNN()
    v = jax.jit(model.init)(jax.random.PRNGKey(0), X[:1])
    rng = np.random.default_rng(0)
    stats = {name: {"mean": jnp.asarray(rng.normal(0, 0.5, s["mean"].shape), jnp.float32),
                    "var": jnp.asarray(rng.uniform(0.2, 3.0, s["var"].shape), jnp.float32)}
             for name, s in v["batch_stats"].items()}
    return SimpleNamespace(models=SimpleNamespace(teacher=model),
                           teacher_variables={**v, "batch_stats": stats}, x_example=X[:1],
                           settings=SimpleNamespace(group_size=8),
                           steps_per_epoch=lambda: 20)


@pytest.mark.parametrize("make", [V.baseline, V.bn_folded, V.int8_ptq, V.int4_group_ptq],
                         ids=lambda f: f.__name__)
def test_deployed_path_computes_what_is_evaluated_and_survives_save(make, tmp_path):
    ctx = _ctx()
    variant = make(ctx)
    evaluated = variant.model.apply(variant.to_variables(variant.stored), X, train=False)
    deployed = variant.infer(variant.prepare(variant.stored), X)
    np.testing.assert_allclose(np.asarray(deployed), np.asarray(evaluated), rtol=1e-4,
                               atol=1e-4)
    jol.save(tmp_path / "v.safetensors", variant.stored)
    loaded = jol.load(tmp_path / "v.safetensors")
    np.testing.assert_array_equal(np.asarray(variant.infer(variant.prepare(loaded), X)),
                                  np.asarray(deployed))
    # Close to the float teacher: folding is exact up to rounding, int8/int4 small errors.
    base = np.asarray(V.float_infer(ctx.models.teacher)(ctx.teacher_variables, X))
    tol = {"baseline": 0, "bn_folded": 1e-4, "int8_ptq": 0.05, "int4_group_ptq": 0.5}[
        variant.name]
    assert np.abs(np.asarray(deployed) - base).max() <= tol * max(1.0, np.abs(base).max())


def test_quantized_variants_store_integer_kernels():
    for make, bits in ((V.int8_ptq, 8), (V.int4_group_ptq, 4)):
        stored = make(_ctx()).stored["params"]
        q = [x for x in jax.tree.leaves(stored, is_leaf=jol.quant.is_qtensor)
             if jol.quant.is_qtensor(x)]
        assert q and all(x.bits == bits for x in q)


def test_kernel_where_and_int4_settings_fall_back_per_channel():
    where = V.int4_settings(_ctx())["where"]
    assert where((), np.ones((16, 4), np.float32)) is True  # 16 inputs: groups of 8 fit
    assert where((), np.ones((3, 3, 1, 32), np.float32)) == {"granularity": "channel"}
    assert where((), np.ones((4,), np.float32)) is False  # a bias
    assert where((), np.ones((16, 4), np.int8)) is False


def test_sparse_stored_round_trips_exactly():
    v = _ctx().teacher_variables
    pruned = {**v, "params": jol.apply_mask(v["params"], jol.magnitude_mask(v["params"], 0.7))}
    stored = V.sparse_stored(pruned)
    back = jol.to_dense(stored["params"])
    for a, b in zip(jax.tree.leaves(pruned["params"]), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert stored["batch_stats"] is pruned["batch_stats"]


def test_gradual_schedule_ramps_from_zero_to_the_target_then_holds():
    schedule = V.gradual_schedule(_ctx(), 0.9, epochs=4)  # 80 steps: ramp over the first 40
    values = [float(schedule(t)) for t in range(0, 81)]
    assert values[0] == 0.0 and values[40] == pytest.approx(0.9) and values[80] == pytest.approx(
        0.9)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
