"""``prune`` optax transformation, ``apply_mask`` and ``sparsity``."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxopt_lab as jol

K = jax.random.split(jax.random.PRNGKey(0), 4)
PARAMS = {
    "l0": {"kernel": jax.random.normal(K[0], (16, 64)), "bias": jnp.zeros(64)},
    "l1": {"kernel": jax.random.normal(K[1], (64, 8)), "bias": jnp.zeros(8)},
}
X = jax.random.normal(K[2], (32, 16))
Y = jnp.arange(32) % 8


def loss(p, x=X, y=Y):
    h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"][None])
    logits = h @ p["l1"]["kernel"] + p["l1"]["bias"][None]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx):
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    return step


def kernels(p):
    return {n: np.asarray(p[n]["kernel"]) for n in ("l0", "l1")}


RISING = jol.polynomial_schedule(0.0, 0.9, 2, 22, frequency=4)
FAST = jol.polynomial_schedule(0.3, 0.9, 0, 3)  # a new mask on each of 4 steps


@pytest.mark.parametrize(
    "opt", [optax.sgd(0.5), optax.adam(3e-2), optax.adamw(3e-2, weight_decay=0.1)],
    ids=["sgd", "adam", "adamw"],
)
def test_pruned_weights_exactly_zero_and_stay_zero(opt):
    tx = optax.chain(opt, jol.prune(jol.magnitude_mask, RISING))
    step = jax.jit(make_step(tx))
    p, s = PARAMS, tx.init(PARAMS)
    prev_zero = {n: np.zeros_like(k, bool) for n, k in kernels(p).items()}
    for t in range(30):
        p, s = step(p, s)
        target = float(RISING(t))
        for name, k in kernels(p).items():
            zero = k == 0
            assert zero.sum() == math.floor(np.float32(target) * k.size * (1 + 2**-22))
            assert not (prev_zero[name] & ~zero).any(), f"step {t}: a pruned weight came back"
            np.testing.assert_array_equal(zero, ~np.asarray(s[1].masks[name]["kernel"]))
            prev_zero[name] = zero
        assert (np.asarray(p["l0"]["bias"]) != 0).any() or t == 0


def test_masks_recomputed_only_on_schedule_steps():
    sched = jol.polynomial_schedule(0.0, 0.8, 0, 12, frequency=4)
    tx = optax.chain(optax.adam(0.1), jol.prune(jol.magnitude_mask, sched))
    step = jax.jit(make_step(tx))
    p, s = PARAMS, tx.init(PARAMS)
    seen = []
    for _ in range(14):
        p, s = step(p, s)
        seen.append((float(s[1].sparsity), np.asarray(s[1].masks["l0"]["kernel"])))
    for t in range(1, 14):
        if float(sched(t)) == float(sched(t - 1)):
            assert seen[t][0] == seen[t - 1][0]
            np.testing.assert_array_equal(seen[t][1], seen[t - 1][1])
    assert seen[-1][0] == np.float32(0.8)


def test_pmap_replicas_agree_with_single_device():
    n = jax.device_count()
    assert n == 8
    tx = optax.chain(optax.adam(3e-2), jol.prune(jol.magnitude_mask, FAST))

    def pstep(p, s):
        g = jax.lax.pmean(jax.grad(loss)(p), "d")
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    pstep = jax.pmap(pstep, axis_name="d")
    single = jax.jit(make_step(tx))
    rep = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), (PARAMS, tx.init(PARAMS)))
    p, s = PARAMS, tx.init(PARAMS)
    for _ in range(4):
        rep = pstep(*rep)
        p, s = single(p, s)
    assert int((~s[1].masks["l0"]["kernel"]).sum()) == math.floor(0.9 * 16 * 64)
    for replica in range(n):
        got = jax.tree.map(lambda a, i=replica: a[i], rep[1][1].masks)
        jax.tree.map(np.testing.assert_array_equal, got, s[1].masks)


def test_axis_name_makes_drifted_replicas_agree():
    tx = jol.prune(jol.magnitude_mask, 0.5, axis_name="d")
    n = jax.device_count()
    noise = jax.random.normal(K[3], (n, 16, 64)) * 0.3  # replicas drifted apart
    params = {"w": PARAMS["l0"]["kernel"][None] + noise}
    _, state = jax.pmap(lambda p: tx.update(p, tx.init(p), p), axis_name="d")(params)
    masks = np.asarray(state.masks["w"])
    assert (masks == masks[:1]).all() and int((~masks[0]).sum()) == 512
    mean = {"w": params["w"].mean(0)}
    np.testing.assert_array_equal(masks[0], np.asarray(jol.magnitude_mask(mean, 0.5)["w"]))


def test_mesh_sharded_params_give_same_masks():
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("a", "b"))
    tx = optax.chain(optax.adam(3e-2), jol.prune(jol.magnitude_mask, 0.7, where=None))
    shard = {"l0": {"kernel": P("a", "b"), "bias": P("b")}, "l1": {"kernel": P("b"), "bias": P()}}
    placed = jax.tree.map(lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec)),
                          PARAMS, shard)
    step = jax.jit(make_step(tx))
    p1, s1 = step(placed, tx.init(placed))
    p2, s2 = step(PARAMS, tx.init(PARAMS))
    jax.tree.map(np.testing.assert_array_equal, s1[1].masks, s2[1].masks)
    assert int((p1["l0"]["kernel"] == 0).sum()) == math.floor(0.7 * 16 * 64)


def test_eager_updates_match_jit_and_compile_once():
    """Eager ``tx.update`` runs one cached compiled program: the mask function is traced
    once over many eager calls (op-by-op dispatch retraced it every call), with the same
    results as the update under ``jit``."""
    traces = []

    def counting_mask(tree, sparsity, *, previous=None):
        traces.append(1)
        return jol.magnitude_mask(tree, sparsity, previous=previous)

    tx = optax.chain(optax.adam(3e-2), jol.prune(counting_mask, FAST))
    eager_p, eager_s = PARAMS, tx.init(PARAMS)
    jit_p, jit_s = PARAMS, tx.init(PARAMS)
    step = jax.jit(make_step(tx))
    for _ in range(5):
        eager_p, eager_s = make_step(tx)(eager_p, eager_s)
        jit_p, jit_s = step(jit_p, jit_s)
    jax.tree.map(np.testing.assert_array_equal, eager_s[1].masks, jit_s[1].masks)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
                 eager_p, jit_p)
    assert len(traces) == 2  # once for the eager program, once inside `step`


def test_extra_args_reach_mask_fn_and_fixed_masks_work():
    grads = jax.grad(loss)(PARAMS)
    tx = optax.chain(optax.sgd(0.1), jol.prune(jol.saliency_mask, 0.5))
    s = tx.init(PARAMS)
    u, s = tx.update(grads, s, PARAMS, grads=grads)
    want = jol.saliency_mask(PARAMS, 0.5, grads=grads)
    jax.tree.map(np.testing.assert_array_equal, s[1].masks, want)
    # random_mask with a key passed at update time; fixed mask trees; nm via partial
    rnd = jol.prune(jol.random_mask, 0.5)
    _, rs = rnd.update(grads, rnd.init(PARAMS), PARAMS, key=jax.random.PRNGKey(1))
    assert int((~rs.masks["l0"]["kernel"]).sum()) == 512
    fixed = jol.prune(want)
    _, fs = fixed.update(grads, fixed.init(PARAMS), PARAMS)
    jax.tree.map(np.testing.assert_array_equal, fs.masks, want)
    nm = jol.prune(functools.partial(jol.nm_mask, n=2, m=4))
    u, ns = nm.update(grads, nm.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, u)["l0"]["kernel"]
    assert (np.asarray(new != 0).reshape(4, 4, 64).sum(1) <= 2).all()


def test_where_limits_pruning_to_selected_leaves():
    tx = jol.prune(jol.magnitude_mask, 0.5, where=lambda p, x: "l1" in str(p) and x.ndim == 2)
    g = jax.tree.map(jnp.zeros_like, PARAMS)
    u, s = tx.update(g, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, u)
    assert int((new["l0"]["kernel"] == 0).sum()) == 0
    assert int((new["l1"]["kernel"] == 0).sum()) == 256


def test_bad_input_raises():
    tx = jol.prune(jol.magnitude_mask, 0.5)
    s = tx.init(PARAMS)
    with pytest.raises(ValueError, match="params"):
        tx.update(PARAMS, s)
    bad = jol.prune(lambda tree, sp: {"l0": tree["l0"]})
    with pytest.raises(ValueError, match="mask tree does not match"):
        bad.update(PARAMS, bad.init(PARAMS), PARAMS)
    wrong_shape = jol.prune(lambda t, sp: jax.tree.map(lambda x: jnp.ones((3,), bool), t))
    with pytest.raises(ValueError, match=r"\['l0'\]\['bias'\]: mask shape"):
        wrong_shape.update(PARAMS, wrong_shape.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="sparsity"):
        jol.prune(jol.magnitude_mask, 1.5)
    with pytest.raises(ValueError, match="mask tree does not match"):
        jol.apply_mask(PARAMS, {"l0": True})


def test_apply_mask_and_sparsity_report():
    mask = jol.magnitude_mask(PARAMS, 0.75)
    pruned = jol.apply_mask(PARAMS, mask)
    rep = jax.jit(jol.sparsity)(pruned)
    assert float(rep.overall) == pytest.approx(0.75, abs=1e-6)
    assert int(rep.nonzero["l0"]["kernel"]) == 256 and float(rep.per_leaf["l0"]["bias"]) == 1.0
    assert rep.size == 16 * 64 + 64 * 8
    assert int(rep.overall_nonzero) == rep.size // 4
    everything = jol.sparsity(pruned, where=lambda p, x: True)
    assert everything.size == rep.size + 72
    assert float(jol.sparsity(mask).overall) == pytest.approx(0.75)
    assert float(jol.sparsity({"e": jnp.zeros((0, 3))}).overall) == 0.0


_sparsity_jit = jax.jit(jol.sparsity)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_sparsity_counts_subnormals_as_nonzero(dtype):
    """Only +0 and -0 are zeros, though XLA flushes subnormals in a float compare (was:
    subnormal weights counted as pruned), eagerly and under jit."""
    tiny = jnp.finfo(dtype).smallest_subnormal
    w = jnp.asarray([[0.0, -0.0, tiny, -tiny], [1.0, jnp.nan, jnp.inf, 0.0]], dtype)
    for rep in (jol.sparsity({"w": w}), _sparsity_jit({"w": w})):
        assert int(rep.nonzero["w"]) == 5 and float(rep.overall) == pytest.approx(3 / 8)
    assert float(_sparsity_jit({"w": jnp.full((2, 2), 1e-45)}).overall) == 0.0
