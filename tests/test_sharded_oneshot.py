"""GPTQ, SparseGPT, Wanda, AWQ, smoothing and calibration statistics on trees sharded with
NamedSharding over the 8 host devices: results sharded like the kernels, equal to the
single-device results (bit for bit, except unstructured SparseGPT's kept weights: a few ulp
on newer XLA), no all-gather in the programs, a ValueError for unsupported layouts."""

import functools
import importlib
import inspect
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxopt_lab as jol
from jaxopt_lab.oneshot import (_obs, _sharded, calibration_stats, gptq, hessian_accumulate,
                                hessian_init, sparsegpt, wanda)


def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("x",))


LEAVES = {  # name: (shape, spec); the stats' K is the product of all axes but the last
    "dense": ((32, 16), P(None, "x")),
    "conv": ((3, 3, 4, 16), P(None, None, None, "x")),
    "bias": ((16,), P("x")),  # not a kernel: untouched
}


def _tree(seed=0, levels=None, leaves=LEAVES):
    mesh, rng = _mesh(), np.random.default_rng(seed)
    tree, stats = {}, {}
    for k, (shape, spec) in leaves.items():
        x = rng.normal(size=shape).astype(np.float32)
        if levels is not None:  # few distinct values: heavy ties in every selection
            x = np.round(x * levels) / levels
        tree[k] = jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
        if len(shape) >= 2:
            kdim = int(np.prod(shape[:-1]))
            rows = rng.normal(size=(2 * kdim, kdim)).astype(np.float32)
            stats[f"['{k}']"] = hessian_accumulate(hessian_init(kdim), rows)
    return tree, stats


def _local(tree):
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


def _storage(x):
    return x.qvalue if isinstance(x, jol.QTensor) else x


def _assert_like(got, want, tree):
    """Sharded like the input leaf, and bit for bit the single-device result."""
    for k in tree:
        g, w = got[k], want[k]
        sharding = _storage(g).sharding
        assert sharding.is_equivalent_to(tree[k].sharding, tree[k].ndim), (k, sharding)
        if isinstance(g, jol.QTensor):
            np.testing.assert_array_equal(np.asarray(g.qvalue), np.asarray(w.qvalue), k)
            np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(w.scale), k)
            assert (g.zero_point is None) == (w.zero_point is None)
            if g.zero_point is not None:
                np.testing.assert_array_equal(np.asarray(g.zero_point),
                                              np.asarray(w.zero_point), k)
            # Scales (and zero points) live with their output columns.
            out_spec = tuple(tree[k].sharding.spec)[-1]
            assert tuple(g.scale.sharding.spec)[-1] == out_spec, (k, g.scale.sharding)
            assert jax.tree.structure(g) == jax.tree.structure(w), k  # layout metadata
        np.testing.assert_array_equal(np.asarray(jol.dequantize(g) if isinstance(
            g, jol.QTensor) else g), np.asarray(jol.dequantize(w) if isinstance(
                w, jol.QTensor) else w), k)


def _gathers(jitted, *args):
    hlo = jitted.lower(*args).compile().as_text()
    # A tuple-shaped result ("(f32[..], f32[..]) all-gather(") counts too.
    return re.findall(r"= (\([^=]*?\)|\S+) all-gather(?:-start)?\(", hlo)


def test_gptq_of_output_sharded_kernels_equals_single_device_without_gathers():
    # Group scales with zero points; the channel path follows in the calibration test.
    tree, stats = _tree()
    kw = dict(bits=4, group_size=4, symmetric=False)
    got = gptq(tree, stats, **kw)
    assert got["bias"] is tree["bias"]
    _assert_like(got, gptq(_local(tree), stats, **kw), tree)
    mesh, spec = _sharded.placement(tree["dense"])
    fn = _sharded._gptq_fn(mesh, spec, 1, 4, 4, False, False, False, False, 0.01, 128)
    assert _gathers(fn, tree["dense"], stats["['dense']"].xtx) == []


@pytest.mark.parametrize("kw", [dict(sparsity=0.77), dict(n=2, m=4, bits=4)],
                         ids=["unstructured", "nm_joint_4bit"])
def test_sparsegpt_of_output_sharded_kernels_equals_single_device(kw):
    # Unstructured SparseGPT ranks each block of rows across all outputs: the sharded
    # selection (bisection with psum'd counts) must pick the same weights; few distinct
    # values make ties that the global flat index decides.
    tree, stats = _tree(3, levels=2)
    got_w, got_m = sparsegpt(tree, stats, block_size=8, **kw)
    want_w, want_m = sparsegpt(_local(tree), stats, block_size=8, **kw)
    _assert_like(got_m, want_m, tree)
    if "sparsity" in kw:
        # The masks are exact, but newer XLA (jax 0.12, measured in CI) compiles the
        # unstructured per-shard update with another operation order than the one-device
        # program: the kept weights then differ by up to 4 ulp (bit-identical on jax 0.10).
        for k in tree:
            assert got_w[k].sharding.is_equivalent_to(tree[k].sharding, tree[k].ndim), k
            np.testing.assert_array_max_ulp(np.asarray(got_w[k]), np.asarray(want_w[k]),
                                            maxulp=8)
    else:
        _assert_like(got_w, want_w, tree)
    if "sparsity" in kw:
        mesh, spec = _sharded.placement(tree["dense"])
        fn = _sharded._sparsegpt_fn(mesh, spec, (0,), 0.77, None, None, None, None, True,
                                    0.01, 8, 16)
        cols = jnp.arange(16, dtype=jnp.int32)
        assert _gathers(fn, tree["dense"], stats["['dense']"].xtx, cols) == []


@functools.cache
def _keep_block_sharded():
    def body(score, prune, cols):
        return _obs.keep_block_sharded(score, prune, axis_name="x", cols=cols, total_cols=32)

    return jax.jit(jax.shard_map(body, mesh=_mesh(), in_specs=(P(None, "x"), P(), P("x")),
                                 out_specs=P(None, "x"), check_vma=False))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), levels=st.sampled_from([1, 2, 3, 1000]),
       frac=st.floats(0.0, 1.0), zeros=st.booleans())
def test_sharded_block_selection_equals_keep_block(seed, levels, frac, zeros):
    # The cross-output selection of unstructured SparseGPT, on its own: any count, heavy
    # ties (ties go by flat index across the shards), zero scores.
    rng = np.random.default_rng(seed)
    score = np.round(rng.random((6, 32)) * levels) / levels
    if zeros:
        score[rng.random(score.shape) < 0.3] = 0.0
    score = jnp.asarray(score ** 2, jnp.float32)
    prune = int(frac * score.size)
    got = _keep_block_sharded()(score, jnp.int32(prune), jnp.arange(32, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_obs.keep_block(score, prune)))
    assert int((~got).sum()) == prune


WANDA = {"output": dict(sparsity=0.5), "nm": dict(n=2, m=4),
         "layer": dict(sparsity=0.3, scope="layer")}


@pytest.mark.parametrize("name", sorted(WANDA))
@pytest.mark.parametrize("levels", [2, None])
def test_wanda_of_output_sharded_kernels_equals_single_device(name, levels):
    tree, stats = _tree(1, levels)
    _assert_like(wanda(tree, stats, **WANDA[name]), wanda(_local(tree), stats, **WANDA[name]),
                 tree)


def test_wanda_layer_scope_takes_contraction_sharding_exactly_without_gathers():
    # The whole kernel is ranked at once: the library's sharded selection, any layout.
    leaves = {"dense": ((64, 8), P("x", None))}
    tree, stats = _tree(2, levels=2, leaves=leaves)
    got = wanda(tree, stats, sparsity=0.6, scope="layer")
    _assert_like(got, wanda(_local(tree), stats, sparsity=0.6, scope="layer"), tree)
    norm = jnp.sqrt(jnp.diag(stats["['dense']"].xtx))
    fn = jax.jit(lambda w, n: _sharded._wanda_layer(w, n, nax=1, prune=307))
    assert _gathers(fn, tree["dense"], norm) == []


def test_wanda_on_a_two_axis_mesh_replicated_along_one_axis():
    # Sharded over "model", replicated over "data": each (data, model) device ranks the
    # columns of its "model" shard.
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    tree, stats = _tree(6, levels=2, leaves={"k": ((32, 16), P())})
    tree = {"k": jax.device_put(tree["k"], NamedSharding(mesh, P(None, "model")))}
    for kw in WANDA.values():
        _assert_like(wanda(tree, stats, **kw), wanda(_local(tree), stats, **kw), tree)


def test_wanda_per_shard_program_has_no_gather():
    tree, stats = _tree()
    mesh, spec = _sharded.placement(tree["dense"])
    norm = jnp.sqrt(jnp.diag(stats["['dense']"].xtx))
    mask_fn = importlib.import_module("jaxopt_lab.oneshot.wanda")._wanda
    fn = _sharded._wanda_fn(mask_fn, mesh, spec, (0,), 0.5, None, None, "output")
    assert _gathers(fn, tree["dense"], norm) == []


def test_unsupported_layouts_raise_naming_the_leaf():
    leaves = {"k": ((32, 16), P("x", None))}  # sharded along the contraction
    tree, stats = _tree(leaves=leaves)
    with pytest.raises(ValueError, match=r"\['k'\]: GPTQ .* contracting axes \(0,\)"):
        gptq(tree, stats)
    with pytest.raises(ValueError, match=r"\['k'\]: SparseGPT .* output axes"):
        sparsegpt(tree, stats, n=2, m=4)
    with pytest.raises(ValueError, match=r"\['k'\]: Wanda per output .* scope='layer'"):
        wanda(tree, stats, sparsity=0.5)
    tree, stats = _tree(leaves={"k": ((32, 16), P(None, "x"))})  # 2 columns a shard
    with pytest.raises(ValueError, match=r"\['k'\]: 3-bit codes pack 8 per word"):
        gptq(tree, stats, bits=3)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(nn.relu(nn.Dense(16)(x)))


def test_calibration_stats_of_sharded_params_and_batches_then_gptq():
    # Parameters sharded along their outputs, batches along their rows: the statistics
    # reduce across the shards to the single-device ones (X^T X and the absolute sums
    # up to float32 reassociation; maxima and counts exactly), and GPTQ of the sharded
    # kernels with them equals GPTQ on one device.
    mesh, model = _mesh(), _MLP()
    # 16 inputs: both kernels (16, 16), one sweep compiled for both.
    xs = [np.random.default_rng(s).normal(size=(32, 16)).astype(np.float32) for s in range(2)]
    variables = model.init(jax.random.key(0), xs[0])
    want = calibration_stats(model, variables, [jnp.asarray(x) for x in xs])

    def place(path, x):
        return jax.device_put(x, NamedSharding(mesh, P(None, "x") if x.ndim == 2 else P("x")))

    sharded = jax.tree_util.tree_map_with_path(place, variables)
    batches = [jax.device_put(x, NamedSharding(mesh, P("x", None))) for x in xs]
    got = calibration_stats(model, sharded, batches)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k].xtx, want[k].xtx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[k].abs_sum, want[k].abs_sum, rtol=1e-6)
        np.testing.assert_array_equal(got[k].abs_max, want[k].abs_max)
        assert int(got[k].count) == int(want[k].count) == 64
    q = gptq(sharded["params"], got, bits=4)
    ref = gptq(_local(sharded["params"]), got, bits=4)
    for layer in ("Dense_0", "Dense_1"):
        kernel = sharded["params"][layer]["kernel"]
        assert q[layer]["kernel"].qvalue.sharding.is_equivalent_to(kernel.sharding, 2)
        np.testing.assert_array_equal(jol.dequantize(q[layer]["kernel"]),
                                      jol.dequantize(ref[layer]["kernel"]))


def test_awq_matrix_of_an_output_sharded_kernel_stays_sharded_and_equal():
    # No code of its own: XLA partitions the grid search column by column (the Hessian
    # replicated); the grid's losses sum across shards in another order, so the chosen
    # exponent could differ from one device's only on a float32 near-tie (not here).
    from jaxopt_lab.oneshot import awq_matrix

    tree, stats = _tree(4, leaves={"k": ((32, 16), P(None, "x"))})
    st_k = stats["['k']"]
    mean = st_k.abs_sum / st_k.count * jnp.linspace(0.1, 4.0, 32)
    got = awq_matrix(tree["k"], st_k.xtx, mean, bits=4, group_size=8)
    want = awq_matrix(np.asarray(tree["k"]), st_k.xtx, mean, bits=4, group_size=8)
    assert float(got.alpha) == float(want.alpha)
    np.testing.assert_array_equal(got.scales, want.scales)
    _assert_like({"k": got.qtensor}, {"k": want.qtensor}, tree)
    _assert_like({"k": got.effective}, {"k": want.effective}, tree)


def test_rotations_of_sharded_kernels_stay_sharded_and_equal():
    # Q^T W and W Q with the kernel sharded along the axis the product does not contract:
    # each shard multiplies its own columns (readers) or rows (writers).
    from jaxopt_lab.oneshot import random_hadamard, rotate_readers, rotate_writers

    mesh = _mesh()
    rng = np.random.default_rng(7)
    q = random_hadamard(jax.random.key(1), 16)
    reader = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
    writer = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    sh_reader = jax.device_put(reader, NamedSharding(mesh, P(None, "x")))
    sh_writer = jax.device_put(writer, NamedSharding(mesh, P("x", None)))
    (got_r,), (got_w,) = rotate_readers([sh_reader], q), rotate_writers([sh_writer], q)
    (want_r,), (want_w,) = rotate_readers([reader], q), rotate_writers([writer], q)
    assert got_r.sharding.spec == sh_reader.sharding.spec
    assert got_w.sharding.spec == sh_writer.sharding.spec
    np.testing.assert_allclose(np.asarray(got_r), np.asarray(want_r), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-6, atol=1e-6)


# --- AWQ and smoothing of whole sharded models ---------------------------------------------

_D, _FFN = 32, 64  # 4 and 8 columns a shard: 4-bit codes pack within each shard


class _Block(nn.Module):
    """Pre-LN: LN -> stock attention (3-D q/k/v kernels, out folded into value), RMSNorm ->
    GELU MLP (explicit), LN -> ReLU MLP (out folded into in, in into the norm)."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
            nn.LayerNorm(name="ln0")(x))
        h = nn.Dense(_FFN, name="gelu_in")(nn.RMSNorm(name="rms")(x))
        x = x + nn.Dense(_D, name="gelu_out")(nn.gelu(h))
        h = nn.relu(nn.Dense(_FFN, name="relu_in")(nn.LayerNorm(name="ln1")(x)))
        return x + nn.Dense(_D, name="relu_out")(h)


@functools.cache
def _block():
    """(sharded variables, variables, model map, stats): every leaf split along its last
    (output) axis over the 8 devices."""
    model = _Block()
    x = jax.random.normal(jax.random.key(3), (4, 8, _D)) * jnp.exp(
        jax.random.uniform(jax.random.key(4), (_D,), minval=-2, maxval=2))[None, None, :]
    v = model.init(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
    mesh = _mesh()
    sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
        mesh, P(*(None,) * (a.ndim - 1), "x"))), v)
    return sharded, v, jol.model_map(model, v, x), calibration_stats(model, v, [x])


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, jol.QTensor))[0]}


def _collectives(hlo):
    """``[(op, largest operand size)]`` of the program's cross-device operations."""
    out = []
    for shapes, op in re.findall(r"= (\([^=]*?\)|\S+) (all-gather|all-to-all|"
                                 r"collective-permute|all-reduce|reduce-scatter)(?:-start)?\(",
                                 hlo):
        dims = re.findall(r"\[([\d,]*)\]", shapes)
        out.append((op, max(int(np.prod([int(d) for d in x.split(",") if d])) for x in dims)))
    return out


def _spy(monkeypatch, module, attr, static=None):
    """Records every call of ``module.attr``: ``(args, kwargs)``, plus the compiled
    program's text for a jitted function with ``static`` argument names (compiled once,
    then run: no second compilation for the check)."""
    calls, real = [], getattr(module, attr)

    def spy(*args, **kwargs):
        if static is None:
            calls.append((args, kwargs))
            return real(*args, **kwargs)
        compiled = real.lower(*args, **kwargs).compile()
        calls.append((args, kwargs, compiled.as_text()))
        bound = inspect.signature(real).bind(*args, **kwargs).arguments
        return compiled(*(v for k, v in bound.items() if k not in static))

    monkeypatch.setattr(module, attr, spy)
    return real, calls


def _no_leaf_crosses(calls, limit):
    """Every recorded program moves at most ``limit(args, kwargs)`` elements across devices
    at once (all-reduces of small vectors), never a gather or a reshuffle of a leaf."""
    assert calls
    for args, kwargs, hlo in calls:
        for op, size in _collectives(hlo):
            assert op == "all-reduce" and size <= limit(args, kwargs), (op, size)


def _fold_programs(fold, calls):
    """`foldflow.fold_scale` (eager, elementwise) of each recorded call as one program."""
    fn = jax.jit(fold, static_argnums=1)
    return [(a, kw, fn.lower(*a, **kw).compile().as_text()) for a, kw in calls]


def test_awq_of_a_sharded_model_equals_single_device_without_gathers(monkeypatch):
    # Every kind of group: 3-D q/k/v sharing the first norm (split along head_dim, which
    # a (K, N) view would merge with the heads and gather), the attention output folded
    # into the value kernel, 2-D kernels folded into a norm and into a Dense (QTensors),
    # an explicit one. The output error of a group is summed kernel by kernel instead of
    # over the concatenated kernels (another float32 order), so the chosen exponents
    # could differ from one device's on a near-tie only (not here); with the same
    # exponent every value is bit for bit the same.
    from jaxopt_lab.core import foldflow
    from jaxopt_lab.oneshot import awq

    sharded, variables, mm, stats = _block()
    real, calls = _spy(monkeypatch, _sharded, "_awq_group", ("plan", "n_grid"))
    fold, folds = _spy(monkeypatch, foldflow, "fold_scale")
    got = awq(sharded, stats, model_map=mm, bits=4, group_size=8)
    monkeypatch.undo()
    want = awq(variables, stats, model_map=mm, bits=4, group_size=8)
    assert got.how == want.how
    assert {p[4] for _, kw, _ in calls for p in kw["plan"]} == {"qtensor", "folded", "effective"}
    assert len(folds) == 5 and any("shared with" in h for h in got.how.values())
    for k in want.scales:
        np.testing.assert_array_equal(np.asarray(got.scales[k]), np.asarray(want.scales[k]))
    _assert_like(_flat(got.params), _flat(want.params), _flat(sharded))
    # Only the grid's losses (one per exponent) cross devices.
    _no_leaf_crosses(calls, lambda a, kw: kw["n_grid"])
    _no_leaf_crosses(_fold_programs(fold, folds), lambda a, kw: 0)


def test_awq_without_a_map_of_sharded_kernels_equals_single_device(monkeypatch):
    # Every scale explicit: float effective weights, no packing (3-bit codes of 2-column
    # shards would cross shard borders), so any output sharding works.
    from jaxopt_lab.oneshot import awq

    tree, stats = _tree(4)
    kw = dict(bits=3, group_size=4, symmetric=False)
    real, calls = _spy(monkeypatch, _sharded, "_awq_group", ("plan", "n_grid"))
    got = awq(tree, stats, **kw)
    monkeypatch.undo()
    want = awq(_local(tree), stats, **kw)
    assert got.params["bias"] is tree["bias"]
    for k in want.scales:
        np.testing.assert_array_equal(np.asarray(got.scales[k]), np.asarray(want.scales[k]))
    _assert_like(got.params, want.params, tree)
    _no_leaf_crosses(calls, lambda a, kw: kw["n_grid"])


def test_awq_refuses_layouts_that_would_gather():
    from jaxopt_lab.oneshot import awq

    tree, stats = _tree(leaves={"k": ((32, 16), P("x", None))})  # split along K
    with pytest.raises(ValueError, match=r"\['k'\]: AWQ .* contracting axes \(0,\)"):
        awq(tree, stats)
    sharded, _, mm, stats = _block()  # relu_out: (64, 32) folded, a QTensor of 4-col shards
    only = lambda path, leaf: jax.tree_util.keystr(path).endswith("['relu_out']['kernel']")  # noqa: E731
    with pytest.raises(ValueError, match=r"relu_out'\]\['kernel'\]: 3-bit codes pack 8"):
        awq(sharded, stats, model_map=mm, bits=3, where=only)


def test_smooth_of_a_sharded_model_equals_single_device_without_gathers(monkeypatch):
    # Row maxima reduce in each kernel's own layout (a max: exact, one (K,) all-reduce);
    # the fold divides the norm's vectors and multiplies the kernels' rows: elementwise.
    # 3-D q/k/v split along head_dim included (a (K, N) view of them would gather).
    from jaxopt_lab.core import foldflow
    from jaxopt_lab.oneshot import smooth

    sq = importlib.import_module("jaxopt_lab.oneshot.smoothquant")
    sharded, variables, mm, stats = _block()
    real, calls = _spy(monkeypatch, sq, "_row_absmax", ("axes",))
    fold, folds = _spy(monkeypatch, foldflow, "fold_scale")
    got, how = smooth(sharded, stats, model_map=mm, alpha=0.5)
    monkeypatch.undo()
    want, how_want = smooth(variables, stats, model_map=mm, alpha=0.5)
    assert how == how_want and len(folds) == 5
    assert how["['params']['gelu_in']['kernel']"].startswith("smoothed into norm")
    assert any(x.ndim == 3 for (x, *_), _, _ in calls)
    _assert_like(_flat(got), _flat(want), _flat(sharded))
    _no_leaf_crosses(calls, lambda a, kw: int(np.prod([a[0].shape[i] for i in a[1]])))
    _no_leaf_crosses(_fold_programs(fold, folds), lambda a, kw: 0)
