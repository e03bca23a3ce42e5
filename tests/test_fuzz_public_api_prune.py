"""Fuzzing the pruning API (issue 7, bad input): mask functions, schedules, ``prune``,
``apply_mask``, ``sparsity``, sparse storage and channel compaction.

See tests/test_fuzz_public_api.py for the contract every call is held to.
"""

from __future__ import annotations

import fractions
import functools
import math

import _fuzz as fz
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fuzz import attempt
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_lab as jol

fuzz = settings(max_examples=fz.EXAMPLES)


# --- pruning: mask functions ------------------------------------------------------------

# Valid by construction: finite float kernels (even axes) among unselected leaves, a sparsity
# in [0, 1] (Python, NumPy or jax scalar), scope "layer"/"global", a `where` that picks
# kernels, and no previous mask or a matching one. Every mask function must return a mask
# that passes every property check. Bad arguments are one at a time in the test after it.
_valid_sparsities = st.one_of(
    st.floats(0, 1),
    st.sampled_from([0.0, 1.0, 0.5, 0.29]),
    st.floats(0, 1, width=32).map(np.float32),
    st.floats(0, 1, width=32).map(jnp.float32),
)
_BAD_SPARSITIES = (-0.1, 1.5, float("nan"), float("inf"), [0.5], np.array([0.5, 0.5]))
_valid_wheres = st.sampled_from((None, None, fz.where_kernels_named))


def _expected_pruned(sparsity, size: int) -> int:
    """The documented count: the exact floor of float32(sparsity) * size."""
    return math.floor(fractions.Fraction(float(np.float32(sparsity))) * size)


@st.composite
def _previous(draw, tree):
    """None, or a bool mask of the tree's structure and leaf shapes."""
    if draw(st.booleans()):
        return None
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    return jax.tree.map(lambda x: rng.random(np.shape(x)) < 0.7, tree)


@st.composite
def _mask_settings(draw, name, tree, sparsity):
    """Valid extra settings of one mask function (and its `grads` for saliency)."""
    if name == "saliency":
        return dict(grads=jax.tree.map(
            lambda x: fz.fill(np.shape(x), np.float32, "wide", draw(st.integers(0, 99))), tree))
    if name == "random":
        return dict(key=jax.random.PRNGKey(draw(st.integers(0, 3))))
    if name == "nm":
        n, m = draw(st.sampled_from([(2, 4), (1, 4), (0, 2), (1, 2), (4, 4)]))
        # axis -1 (length 4 on every valid kernel) always divides; -2 and 0 may not (such a
        # leaf is left unpruned: a documented fallback, checked below)
        return dict(n=n, m=m, axis=draw(st.sampled_from([-1, -1, -2, 0])),
                    sparsity=draw(st.sampled_from([None, sparsity])))
    if name == "channel":
        return dict(norm=draw(st.sampled_from(["l1", "l2"])),
                    axis=draw(st.sampled_from([-1, -1, 0])))
    return {}


def _call_mask(name, tree, sparsity, *, scope, where, previous, extra):
    kw = dict(where=where, previous=previous)
    if name == "magnitude":
        return attempt(jol.magnitude_mask, tree, sparsity, scope=scope, **kw)
    if name == "random":
        return attempt(jol.random_mask, tree, sparsity, scope=scope, key=extra["key"], **kw)
    if name == "saliency":
        return attempt(jol.saliency_mask, tree, sparsity, scope=scope, grads=extra["grads"],
                       **kw)
    if name == "nm":
        return attempt(jol.nm_mask, tree, extra["sparsity"], n=extra["n"], m=extra["m"],
                       axis=extra["axis"], **kw)
    return attempt(jol.channel_mask, tree, sparsity, norm=extra["norm"], axis=extra["axis"],
                   **kw)


MASK_FNS = ("magnitude", "random", "saliency", "nm", "channel")


@fuzz
@given(data=st.data(), tree=fz.kernel_trees(), sparsity=_valid_sparsities,
       scope=st.sampled_from(["layer", "global"]), where=_valid_wheres)
def test_mask_functions(data, tree, sparsity, scope, where):
    """All five mask functions on every example, valid input only: none may raise."""
    previous = data.draw(_previous(tree))
    for name in MASK_FNS:
        extra = data.draw(_mask_settings(name, tree, sparsity))
        mask, err = _call_mask(name, tree, sparsity, scope=scope, where=where,
                               previous=previous, extra=extra)
        assert err is None, f"{name}_mask rejected valid input: {err}"
        _check_mask(name, tree, sparsity, scope, where, previous, mask, extra)
    fz.checked()


@st.composite
def _invalid_mask_calls(draw):
    """``(name, sparsity, scope, previous, extra, what)``: valid settings but one bad one."""
    name = draw(st.sampled_from(MASK_FNS))
    tree = draw(fz.kernel_trees())
    sparsity, scope, previous = 0.5, "layer", None
    extra = draw(_mask_settings(name, tree, sparsity))
    bad = {"sparsity": None, "previous": None}
    if name in ("magnitude", "random", "saliency"):
        bad["scope"] = None
    if name == "saliency":
        bad["grads"] = None
    if name == "nm":
        bad.update(nm=None, axis=None)
        del bad["sparsity"]  # (None is nm's full pattern; a bad number is below)
        bad["nm_sparsity"] = None
    if name == "channel":
        bad.update(norm=None, axis=None)
    what = draw(st.sampled_from(sorted(bad)))
    if what == "sparsity":
        sparsity = draw(st.sampled_from(_BAD_SPARSITIES + (None,)))
    elif what == "nm_sparsity":
        extra["sparsity"] = draw(st.sampled_from(_BAD_SPARSITIES))
    elif what == "previous":
        previous = draw(st.sampled_from([
            {"other": np.ones(3, bool)},  # another structure
            jax.tree.map(lambda x: np.ones(np.shape(x) + (2,), bool), tree)]))  # shapes
    elif what == "scope":
        scope = draw(st.sampled_from(["row", "Layer", None]))
    elif what == "grads":
        extra["grads"] = {"g": np.ones(2)}
    elif what == "nm":
        extra["n"], extra["m"] = draw(st.sampled_from([(3, 2), (2, 0), (-1, 4), (2.0, 4)]))
    elif what == "axis":
        extra["axis"] = draw(st.sampled_from([3, 5, -4]))  # kernels have ndim <= 3
    else:
        extra["norm"] = draw(st.sampled_from(["l3", "L2", None]))
    return name, tree, sparsity, scope, previous, extra, what


@fuzz
@given(call=_invalid_mask_calls(), where=_valid_wheres)
def test_mask_functions_reject_invalid_input(call, where):
    name, tree, sparsity, scope, previous, extra, what = call
    fn = {"magnitude": jol.magnitude_mask, "random": jol.random_mask,
          "saliency": jol.saliency_mask, "nm": jol.nm_mask, "channel": jol.channel_mask}[name]
    _, err = _call_mask(name, tree, sparsity, scope=scope, where=where, previous=previous,
                        extra=extra)
    assert err is not None, f"{fn.__name__} accepted a bad {what}"
    fz.error_checked()


def _check_mask(name, tree, sparsity, scope, where, previous, mask, extra):
    assert jax.tree.structure(mask) == jax.tree.structure(tree)
    picked = jax.tree.leaves(jol._select.selection(tree, where))
    prev = [None] * len(picked) if previous is None else jax.tree.leaves(previous)
    sel = []
    for x, m, on, p in zip(jax.tree.leaves(tree), jax.tree.leaves(mask), picked, prev):
        m = np.asarray(m)
        assert m.dtype == bool and m.shape == np.shape(x)
        if not on:
            assert m.all()
            continue
        sel.append((x, m))
        if p is not None and name not in ("nm", "channel"):  # nested on `previous`
            assert (~m)[~p].all() if (~m).sum() >= (~p).sum() else m[p].all()
    if name in ("magnitude", "random", "saliency"):
        for group in ([sel] if scope == "global" else [[pair] for pair in sel]):
            size = sum(np.size(x) for x, _ in group)
            assert sum((~m).sum() for _, m in group) == _expected_pruned(sparsity, size)
            if previous is None and name == "magnitude":
                _check_ranking([(fz.float32_abs_scores(x), m) for x, m in group])
    if name == "saliency" and previous is None:
        scored = []
        for x, g, on, m in zip(jax.tree.leaves(tree), jax.tree.leaves(extra["grads"]), picked,
                               jax.tree.leaves(mask)):
            if on:
                w = fz.ftz(fz.jax_view(x).astype(np.float32))
                with np.errstate(all="ignore"):  # XLA flushes subnormal operands and
                    product = fz.ftz(w * fz.ftz(np.asarray(g, np.float32)))  # products to 0
                scored.append((fz.float32_abs_scores(product), np.asarray(m)))
        for group in ([scored] if scope == "global" else [[pair] for pair in scored]):
            _check_ranking(group)
    elif name == "nm":
        n, m_, axis, s = extra["n"], extra["m"], extra["axis"], extra["sparsity"]
        for _, m in sel:
            if m.shape[axis] % m_:  # no N:M layout fits: left unpruned (and reported)
                assert m.all()
                continue
            groups = np.moveaxis(m, axis, -1).reshape(-1, m_)
            prune = m_ - n if s is None else min(m_ - n, _expected_pruned(s, m_))
            kept = groups.sum(-1)
            assert (kept == m_ - prune).all() if previous is None else (kept <= m_ - prune).all()
    elif name == "channel":
        axis = extra["axis"]
        for _, m in sel:
            if m.size == 0:  # an empty leaf: an empty all-True mask (shape checked above)
                continue
            per_channel = np.moveaxis(m, axis, -1).reshape(-1, m.shape[axis])
            assert (per_channel == per_channel[:1]).all()  # whole channels
            if previous is None:
                assert (~per_channel[0]).sum() == _expected_pruned(sparsity, m.shape[axis])


def _check_ranking(scored):
    """Every kept entry ranks at least as high as every pruned one."""
    kept = [s[m] for s, m in scored if m.any()]
    gone = [s[~m] for s, m in scored if (~m).any()]
    if kept and gone:
        assert max(g.max() for g in gone) <= min(k.min() for k in kept)


# --- pruning: schedules ------------------------------------------------------------------

_BAD_SCHEDULE_ARGS = {
    "s_i": [-0.1, 1.5, float("nan"), None, "0.5", jnp.float32(0.5)],
    "s_f": [-0.1, 1.5, float("inf"), None, [0.5]],
    "t0": [-1, 2**31, 2**40, 1.5, True, "3"],
    "t1": [-5, 2**31, 2.5],
    "frequency": [0, -2, 2.5],
    "power": [0, -1, float("nan")],
}


@fuzz
@given(data=st.data(), s_i=st.floats(0, 1), s_f=st.floats(0, 1), t0=st.integers(0, 50),
       span=st.sampled_from([1, 7, 40, 0, -3]), frequency=st.sampled_from([1, 1, 3, 7]),
       power=st.sampled_from([3, 3, 1, 0.5, 2.0]), as_numpy=st.booleans(),
       broken=st.sampled_from([None] * 4 + sorted(_BAD_SCHEDULE_ARGS)))
def test_schedules(data, s_i, s_f, t0, span, frequency, power, as_numpy, broken):
    """All three schedules on every example: valid settings (span <= 0 makes the step
    range empty) or exactly one bad argument."""
    if as_numpy:
        s_i, s_f = np.float32(s_i), np.float64(s_f)
    args = dict(s_i=s_i, s_f=s_f, t0=t0, t1=t0 + span, frequency=frequency, power=power)
    if broken:
        args[broken] = data.draw(st.sampled_from(_BAD_SCHEDULE_ARGS[broken]))
    s_i, s_f, t0, t1, frequency, power = args.values()
    ts = np.array([0, 1, 2, 5, 17, 49, 50, 51, 1000, 2**31 - 1], np.int32)
    uses = {"constant": {"s_f"}, "one_shot": {"s_f", "t0"}, "polynomial": set(args)}
    for kind in ("constant", "one_shot", "polynomial"):
        if kind == "constant":
            sched, err = attempt(jol.constant_schedule, s_f)
        elif kind == "one_shot":
            sched, err = attempt(jol.one_shot_schedule, s_f, t0)
        else:
            sched, err = attempt(jol.polynomial_schedule, s_i, s_f, t0, t1,
                                 frequency=frequency, power=power)
        bad = broken in uses[kind] or (kind == "polynomial" and span <= 0)
        assert (err is not None) == bad, (kind, broken, err)
        if err is not None:
            fz.error_checked()
            continue
        values = np.asarray([sched(int(t)) for t in ts])
        assert values.dtype == np.float32 and np.isfinite(values).all()
        # (batched, the power may lower to exp/log: equal to a few float32 ulps, not bits)
        np.testing.assert_allclose(np.asarray(jax.vmap(sched)(ts)), values, rtol=1e-5)
        s_f32 = np.float32(s_f)
        if kind == "constant":
            assert (values == s_f32).all()
        elif kind == "one_shot":
            np.testing.assert_array_equal(values, np.where(ts >= t0, s_f32, np.float32(0)))
        else:
            lo, hi = sorted((np.float32(s_i), s_f32))
            assert ((values >= lo) & (values <= hi)).all()
            np.testing.assert_array_equal(values[ts <= t0], np.float32(s_i))
            np.testing.assert_array_equal(values[ts >= t1], s_f32)
            steps = np.diff(values)
            assert (steps >= 0).all() if s_f32 >= np.float32(s_i) else (steps <= 0).all()
        fz.checked()


# --- pruning: the optax transformation, apply_mask, sparsity, sparse storage -------------

PRUNE_TXS = {
    "magnitude": lambda: jol.prune(jol.magnitude_mask, 0.5),
    "gradual": lambda: jol.prune(jol.magnitude_mask, jol.polynomial_schedule(0.0, 0.75, 0, 2)),
    "nm24": lambda: jol.prune(functools.partial(jol.nm_mask, n=2, m=4, axis=-1)),
    "channel_global": lambda: jol.prune(functools.partial(jol.magnitude_mask, scope="global"),
                                        jol.one_shot_schedule(0.25, 1)),
}


@functools.cache
def _prune_tx(name):
    """One chained transformation per kind, its update jitted once (cached per tree shape)."""
    tx = optax.chain(optax.sgd(0.1), PRUNE_TXS[name]())
    return tx, jax.jit(tx.update)


_prune_params = st.builds(  # few shapes and dtypes: one compile each, values vary freely
    lambda k, b: {"k": k, "b": b},
    fz.arrays(shapes=((4, 4), (2, 2, 4)), dtypes=(np.dtype(np.float32), np.dtype(jnp.bfloat16)),
              as_jax=True),
    fz.arrays(shapes=((4,),), dtypes=(np.dtype(np.float32),), as_jax=True))


_PRUNE_ARGS = (  # (mask_fn, schedule) given to prune(): valid and bad
    (jol.magnitude_mask, 0.5), (jol.magnitude_mask, None), (jol.channel_mask, 0.25),
    (functools.partial(jol.nm_mask, n=2, m=4, axis=-1), None),
    (jol.magnitude_mask, jol.polynomial_schedule(0.0, 0.5, 0, 4)),
    (jol.magnitude_mask, 1.5), (jol.magnitude_mask, -0.1), (jol.magnitude_mask, "0.5"),
    (jol.magnitude_mask, float("nan")),
)


@fuzz
@given(params=_prune_params, name=st.sampled_from(sorted(PRUNE_TXS)),
       grad_kind=st.sampled_from(fz.KINDS), mismatched=st.sampled_from([False] * 4 + [True]),
       args=st.sampled_from(_PRUNE_ARGS), where=st.sampled_from([None, fz.where_floats]))
def test_prune_keeps_pruned_weights_zero(params, name, grad_kind, mismatched, args, where):
    # prune() itself on every example: bad settings raise at construction, init is cheap
    # (the updates below use a few cached, jitted transformations: one compile per shape).
    made, err = attempt(jol.prune, *args, where=where)
    if err is None:
        fresh = made.init(params)
        assert jax.tree.structure(fresh.masks) == jax.tree.structure(params)
        assert all(np.asarray(m).all() for m in jax.tree.leaves(fresh.masks))
        assert int(fresh.count) == 0
    else:
        assert isinstance(args[1], (float, str)) and not (0 <= float(
            args[1] if not isinstance(args[1], str) else "nan") <= 1)
    tx, update = _prune_tx(name)
    state = tx.init(params)
    if mismatched:
        fz.raises(update, {"other": jnp.ones(3)}, state, params)  # invalid by construction
        return
    masks_before = None
    for step in range(3):
        grads = jax.tree.map(
            lambda p, seed=step: jnp.asarray(fz.fill(p.shape, p.dtype, grad_kind, seed)), params)
        updates, state = update(grads, state, params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)
        finite_before = jax.tree.map(lambda p: np.isfinite(np.asarray(p, np.float32)), params)
        params = optax.apply_updates(params, updates)
        masks = state[1].masks
        for p, m, ok in zip(jax.tree.leaves(params), jax.tree.leaves(masks),
                            jax.tree.leaves(finite_before)):
            p, m = np.asarray(p, np.float32), np.asarray(m)
            assert m.shape == p.shape
            assert (p[~m & ok] == 0).all(), "a pruned (finite) weight is not exactly zero"
        if masks_before is not None:  # pruned stays pruned
            for m0, m1 in zip(jax.tree.leaves(masks_before), jax.tree.leaves(masks)):
                assert not (np.asarray(m1) & ~np.asarray(m0)).any()
        masks_before = masks
    assert np.asarray(state[1].masks["k"]).size == params["k"].size
    assert np.asarray(state[1].masks["b"]).all()  # biases are never selected
    fz.checked()


# Mask kinds for apply_mask: (kind, valid). Valid masks are bool or 0/1 leaves of the leaf's
# shape or broadcastable to it; invalid ones have another structure or a shape that does not
# broadcast to the leaf's.
_MASK_KINDS = (("bool", True), ("bool", True), ("broadcast", True), ("int", True),
               ("structure", False), ("shape", False))


@st.composite
def _mask_for(draw, tree, kind):
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    if kind == "structure":
        return {"zzz": True}
    if kind == "broadcast":  # a leading-axis-free row
        return jax.tree.map(lambda x: rng.random(np.shape(x)[1:]) < 0.5, tree)
    if kind == "shape":  # one more axis: never broadcasts to the leaf
        return jax.tree.map(lambda x: np.ones(np.shape(x) + (2,), bool), tree)
    if kind == "int":  # non-bool masks: 0/1 ints
        return jax.tree.map(lambda x: (rng.random(np.shape(x)) < 0.5).astype(np.int32), tree)
    return jax.tree.map(lambda x: rng.random(np.shape(x)) < 0.5, tree)


@fuzz
@given(data=st.data(), tree=fz.trees(), where=st.sampled_from((None, fz.where_all)),
       kind=fz.pick(_MASK_KINDS))
def test_apply_mask_sparsity_and_sparse_storage(data, tree, where, kind):
    """apply_mask (a valid mask: properties; an invalid one: must raise), then sparsity,
    to_sparse and to_dense (any tree is valid) on every example."""
    kind, valid = kind
    mask = data.draw(_mask_for(tree, kind))
    if not valid:
        fz.raises(jol.apply_mask, tree, mask)
    else:
        out, err = attempt(jol.apply_mask, tree, mask)
        assert err is None, f"apply_mask rejected a valid {kind} mask: {err}"
        assert jax.tree.structure(out) == jax.tree.structure(tree)
        for x, m, y in zip(jax.tree.leaves(tree), jax.tree.leaves(mask), jax.tree.leaves(out)):
            m = np.broadcast_to(np.asarray(m).astype(bool), np.shape(x))
            y, xv = np.asarray(y), fz.jax_view(x)
            assert y.shape == np.shape(x) and y.dtype == fz.canonical_dtype(xv.dtype)
            assert fz.same_bits(y[m], np.asarray(xv, y.dtype)[m])
            assert fz.same_bits(y[~m], np.zeros_like(y[~m]))
    _check_sparsity(tree)
    always = data.draw(st.booleans())
    sparse, err = attempt(jol.to_sparse, tree, where=where, always=always)
    assert err is None, err
    if not always:
        assert jol.tree_nbytes(sparse) <= jol.tree_nbytes(tree)
    dense = jol.to_dense(sparse)
    assert jax.tree.structure(dense) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(dense)):
        assert fz.same_bits(fz.jax_view(x), fz.jax_view(y)), (x, y)
    if valid:  # (an invalid mask's example checked sparsity and storage, not apply_mask)
        fz.checked()


def _check_sparsity(tree):
    rep = jol.sparsity(tree)
    picked = jax.tree.leaves(jol._select.selection(
        tree, lambda p, x: np.ndim(x) >= 2 and (fz.is_float(x) or np.asarray(x).dtype == bool)))
    total = nonzero = 0
    for x, f, c, on in zip(jax.tree.leaves(tree), jax.tree.leaves(rep.per_leaf),
                           jax.tree.leaves(rep.nonzero), picked):
        nz = int(np.count_nonzero(fz.jax_view(x)))
        assert int(c) == nz and 0 <= float(f) <= 1
        assert float(f) == pytest.approx(1 - nz / np.size(x) if np.size(x) else 0.0, abs=1e-6)
        total, nonzero = total + (np.size(x) if on else 0), nonzero + (nz if on else 0)
    assert rep.size == total and int(rep.overall_nonzero) == nonzero
    assert float(rep.overall) == pytest.approx(1 - nonzero / total if total else 0.0, abs=1e-6)


# --- pruning: channel compaction ----------------------------------------------------------

@functools.cache
def _compact_model():
    model = jol.app.MLP(hidden=(4, 3), num_classes=2)
    x = jnp.asarray(fz.fill((2, 5), np.float32, "normal", 0))
    return model, model.init(jax.random.PRNGKey(0), x), x


@fuzz
@given(seed=st.integers(0, 2**16), keep=st.floats(0, 1), kind=st.integers(0, 4))
def test_compact_and_expand_channel_mask(seed, keep, kind):
    model, variables, x = _compact_model()
    rng = np.random.default_rng(seed)
    params = variables["params"]
    mask = jax.tree.map(lambda p: rng.random(p.shape) < keep, params)
    if kind == 0:  # whole channels, as channel_mask makes
        mask = jol.channel_mask(params, 1 - keep)
    elif kind == 1:
        mask = {"Dense_0": mask["Dense_0"]}
    elif kind == 2:
        mask = jax.tree.map(lambda m: m[..., :1], mask)
    if kind == 1:  # a mask tree missing a layer: invalid for both, by construction
        fz.raises(jol.expand_channel_mask, model, variables, mask, x)
        fz.raises(jol.compact, model, variables, mask, x)
        return
    alive = [int(np.asarray(mask[k]["kernel"]).any(axis=0).sum()) for k in ("Dense_0",
                                                                         "Dense_1")]
    expanded, err = attempt(jol.expand_channel_mask, model, variables, mask, x)
    result, c_err = attempt(jol.compact, model, variables, mask, x)
    if 0 in alive:  # a hidden layer with no channel left cannot be compacted: documented error,
        # from both (the channel flow refuses before expanding)
        for e in (err, c_err):
            assert e is not None and "lose all" in str(e), (alive, e)
        fz.error_checked()
        return
    assert err is None, f"expand_channel_mask rejected a mask of the params' structure: {err}"
    err = c_err
    alive = [int(np.asarray(expanded[k]["kernel"]).any(axis=0).sum()) for k in ("Dense_0",
                                                                             "Dense_1")]
    assert err is None, f"compact rejected a mask that keeps a channel in every layer: {err}"
    masked = {**variables, "params": jol.apply_mask(params, expanded)}
    small, small_vars = result
    want = model.apply(masked, x)
    got = small.apply(small_vars, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert list(small.hidden) == alive
    fz.checked()
