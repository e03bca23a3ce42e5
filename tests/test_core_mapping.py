"""The model map on models built from stock Flax layers, linen and NNX."""

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import _flax_models as fm
import jaxopt_lab as jol
from jaxopt_lab.core.capture import layer_inputs
from jaxopt_lab.core.mapping import ROLES


@functools.cache
def _linen(partitioned=False):
    model, variables, ids = fm.linen_transformer(partitioned)
    return model, variables, ids, jol.model_map(model, variables, ids)


def _roles(mm):
    return {"/".join(k): v.role for k, v in mm.items()}


@pytest.mark.parametrize("partitioned", [False, True])
def test_linen_transformer_roles_and_axes(partitioned):
    _, _, _, mm = _linen(partitioned)
    roles = _roles(mm)
    att = "params/LinenBlock_0/MultiHeadDotProductAttention_0"
    assert roles[f"{att}/query/bias"] == roles[f"{att}/out/bias"] == "bias"
    assert roles["params/LinenBlock_0/LayerNorm_0/scale"] == "norm"
    assert roles["params/LinenBlock_0/RMSNorm_0/scale"] == "norm"
    q = mm[tuple(f"{att}/query/kernel".split("/"))]
    assert (q.role, q.contracting, q.outputs, q.shape) == (
        "kernel", (0,), (1, 2), (fm.EMBED, fm.HEADS, fm.HEAD_DIM))
    o = mm[tuple(f"{att}/out/kernel".split("/"))]
    assert (o.contracting, o.outputs) == ((0, 1), (2,))
    up = mm.lookup(("LinenBlock_0", "DenseGeneral_0", "kernel"))  # a subtree path works
    assert (up.contracting, up.outputs, up.layer) == ((0,), (1, 2), "LinenBlock_0/DenseGeneral_0")
    down = mm.lookup(("LinenBlock_1", "Einsum_0", "kernel"))
    assert (down.contracting, down.outputs) == ((0, 1), (2,))
    emb = mm.lookup(("Embed_0", "embedding"))
    assert (emb.role, emb.contracting, emb.outputs) == ("embedding", (1,), (0,))
    assert {u.op for u in emb.uses} == {"gather", "dot_general"}  # tied: attend uses it too


def test_nnx_transformer_matches_linen_roles():
    model, ids = fm.nnx_transformer()
    mm = jol.model_map(model, None, ids)
    assert mm.api == "nnx"
    q = mm.lookup(("blocks", "0", "attn", "query", "kernel"))
    assert (q.role, q.contracting, q.outputs, q.layer) == ("kernel", (0,), (1, 2),
                                                            "blocks/0/attn/query")
    assert mm.lookup(("blocks", "1", "attn", "out", "kernel")).contracting == (0, 1)
    assert mm.lookup(("blocks", "0", "attn", "query", "bias")).role == "bias"
    assert mm.lookup(("blocks", "0", "down", "kernel")).contracting == (0, 1)
    assert mm.lookup(("blocks", "0", "up", "kernel")).outputs == (1, 2)
    assert mm.lookup(("embed", "embedding")).role == "embedding"
    assert mm.lookup(("blocks", "0", "norm2", "scale")).role == "norm"


@pytest.mark.parametrize("channels", [1, 3])
def test_convnet_roles_both_apis(channels):
    model, variables, x = fm.linen_convnet(channels)
    mm = jol.model_map(model, variables, x)
    k = mm.lookup(("Conv_0", "kernel"))
    assert (k.role, k.contracting, k.outputs, k.shape) == ("kernel", (0, 1, 2), (3,),
                                                           (3, 3, channels, 16))
    assert mm.lookup(("batch_stats", "BatchNorm_0", "mean")).role != "kernel"
    nmodel, nx = fm.nnx_convnet(channels)
    nmm = jol.model_map(nmodel, None, nx)
    assert nmm.lookup(("convs", "0", "kernel")).contracting == (0, 1, 2)


def _convnet_maps():
    model, variables, x = fm.linen_convnet(3)
    nmodel, nx = fm.nnx_convnet(3)
    return ((model, variables, x, jol.model_map(model, variables, x), "BatchNorm_{}"),
            (nmodel, None, nx, jol.model_map(nmodel, None, nx), "bns/{}"))


def test_batch_norm_stats_have_their_own_role_both_apis():
    """Running mean and variance are "batch_stats" (the mean is added like a bias, but is
    not one); the BatchNorm's scale stays "norm" and its offset "bias"."""
    for _, _, _, mm, bn in _convnet_maps():
        roles = {"/".join(k): v.role for k, v in mm.items() if bn.format(0) in "/".join(k)}
        assert {k.rsplit("/", 1)[1]: r for k, r in roles.items()} == {
            "mean": "batch_stats", "var": "batch_stats", "scale": "norm", "bias": "bias"}
        assert not any(mm[k].contracting or mm[k].outputs for k in mm
                       if mm[k].role == "batch_stats")
    assert "batch_stats" in ROLES


def test_defaults_and_bias_selection_skip_batch_stats():
    model, variables, x, mm, _ = _convnet_maps()[0]
    stats = [p for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
             if mm.lookup(p).role == "batch_stats"]
    assert len(stats) == 4
    for m in (None, mm):
        q = jol.quantize(variables, bits=8, model_map=m)
        masks = jol.magnitude_mask(variables, 0.5, model_map=m)
        for path in stats:
            leaf = functools.reduce(lambda t, k: t[k.key], path, variables)
            assert functools.reduce(lambda t, k: t[k.key], path, q) is leaf
            assert functools.reduce(lambda t, k: t[k.key], path, masks).all()
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    assert not any(mm.where("bias")(p, v) for p, v in flat if p in stats)
    assert [p for p, v in flat if mm.where("batch_stats")(p, v)] == stats


def test_bn_fold_still_folds_the_stats_both_apis():
    (model, variables, x, _, _), (nmodel, _, nx, _, _) = _convnet_maps()
    folded, report = jol.bn_fold(model, variables, x, return_report=True)
    assert len(report.folded) == 2
    for k in range(2):
        assert (np.asarray(folded["batch_stats"][f"BatchNorm_{k}"]["mean"]) == 0).all()
    chex.assert_trees_all_close(model.apply(folded, x), model.apply(variables, x),
                                atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(jol.bn_fold(nmodel, nx)(nx), nmodel(nx), atol=1e-4, rtol=1e-4)


def test_map_axes_agree_with_the_contraction():
    """For every captured kernel, X @ W(K, N) is the op's output: the axes are the op's."""
    model, variables, ids, mm = _linen()
    _, xs = layer_inputs(model, variables, ids)
    params = fm.unbox(variables)
    assert len(xs) >= 10
    for names, x in xs.items():
        info = mm[names]
        w = functools.reduce(lambda t, k: t[k], names, params)
        perm = info.contracting + info.outputs
        w2 = jnp.transpose(w, perm).reshape(x.shape[1], -1)
        assert x.shape[1] == np.prod([w.shape[a] for a in info.contracting])
        assert np.isfinite(np.asarray(x @ w2)).all()


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.booleans())
def test_dense_general_axes_property(n_in, heads, head_dim, two_in):
    """DenseGeneral over one or two input axes: contracting = the input axes."""
    axis = (-2, -1) if two_in else -1
    shape = (2, n_in, 3) if two_in else (2, 3)
    model = nn.DenseGeneral((heads, head_dim), axis=axis)
    x = jnp.ones(shape)
    mm = jol.model_map(model, model.init(jax.random.PRNGKey(0), x), x)
    k = mm.lookup(("params", "kernel"))
    n_con = 2 if two_in else 1
    assert k.contracting == tuple(range(n_con))
    assert k.outputs == (n_con, n_con + 1)


def test_quantize_with_map_groups_every_transformer_kernel_no_override():
    model, variables, ids, mm = _linen(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jol.LayoutFallbackWarning)
        q = jol.quantize(variables, bits=4, granularity="group", group_size=128, model_map=mm)
    leaves = jax.tree_util.tree_flatten_with_path(q, is_leaf=lambda x: isinstance(x, jol.QTensor))[0]
    quantized = {jol.core.mapping.path_names(p): x for p, x in leaves if isinstance(x, jol.QTensor)}
    kernels = {k for k, v in mm.items() if v.role == "kernel"}
    assert set(quantized) == kernels  # embeddings, biases and norms stay float
    for names, qt in quantized.items():
        assert qt.granularity == "group" and qt.group_axis == mm[names].contracting
    # Output of the quantized model equals apply(dequantize) and stays close to float.
    y_q = jol.quantized_apply(model, q, ids)
    y_d = model.apply(jol.dequantize(q), ids)
    chex.assert_trees_all_close(y_q, y_d, atol=2e-4, rtol=2e-4)


def test_quantize_channel_scales_per_real_output_element():
    _, variables, _, mm = _linen()
    q = jol.quantize(variables["params"], bits=8, model_map=mm)
    qk = q["LinenBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert qk.axis == (1, 2) and qk.scale.shape == (fm.HEADS, fm.HEAD_DIM)
    assert not isinstance(q["LinenBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["bias"],
                          jol.QTensor)
    # Without the map the shape rule shares scales across heads (the old behaviour).
    q0 = jol.quantize(variables["params"], bits=8)
    assert q0["LinenBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"].axis == (2,)


@pytest.mark.parametrize("channels", [1, 3])
def test_first_conv_falls_back_and_is_reported(channels):
    model, variables, x = fm.linen_convnet(channels)
    mm = jol.model_map(model, variables, x)
    with pytest.warns(jol.LayoutFallbackWarning) as record:
        q = jol.quantize(variables["params"], bits=4, granularity="group", group_size=16,
                         model_map=mm)
    message = str(record[0].message)
    assert "['Conv_0']['kernel']" in message and "Conv_1" not in message
    assert q["Conv_0"]["kernel"].granularity == "channel"
    assert q["Conv_1"]["kernel"].group_axis == (0, 1, 2)  # 3 * 3 * 16 = 144 = 9 groups
    assert q["Dense_0"]["kernel"].group_axis == (0,)


def test_nm_mask_with_map_runs_along_the_real_contraction():
    _, variables, _, mm = _linen()
    masks = jol.nm_mask(variables["params"], n=2, m=4, model_map=mm)
    q = masks["LinenBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    groups = np.asarray(q).reshape(fm.EMBED // 4, 4, -1)  # along embed, not heads
    assert (groups.sum(axis=1) == 2).all()
    o = masks["LinenBlock_0"]["MultiHeadDotProductAttention_0"]["out"]["kernel"]
    flat = np.asarray(o).reshape(-1, fm.EMBED)  # heads x head_dim flattened
    assert (flat.reshape(-1, 4, fm.EMBED).sum(axis=1) == 2).all()
    assert masks["LinenBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["bias"].all()
    assert masks["Embed_0"]["embedding"].all()


def test_channel_mask_with_map_prunes_real_output_units():
    _, variables, _, mm = _linen()
    masks = jol.channel_mask(variables["params"], 0.25, model_map=mm)
    q = np.asarray(masks["LinenBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    assert (q == q[:1]).all()  # constant along the contraction
    assert (~q[0]).sum() == (fm.HEADS * fm.HEAD_DIM) // 4  # a quarter of heads x head_dim


def test_nnx_quantized_apply_weight_only_and_w8a8():
    model, ids = fm.nnx_transformer()
    mm = jol.model_map(model, None, ids)
    params = nnx.state(model, nnx.Param)
    q = jol.quantize(params, bits=8, model_map=mm)
    y = model(ids)
    y_wo = jol.quantized_apply(model, q, ids)
    y_deq = jol.quantized_apply(model, jax.tree.map(lambda x: x, jol.dequantize(q)), ids)
    chex.assert_trees_all_close(y_wo, y_deq, atol=2e-4, rtol=2e-4)
    y_w8 = jax.jit(lambda q, ids: jol.quantized_apply(model, q, ids, mode="w8a8"))(q, ids)
    rel = float(jnp.linalg.norm(y_w8 - y) / jnp.linalg.norm(y))
    assert rel < 0.05, rel
    jaxpr = str(jax.make_jaxpr(lambda q: jol.quantized_apply(model, q, ids, mode="w8a8"))(q))
    assert "i8" in jaxpr and "preferred_element_type=int32" in jaxpr


def test_partitioned_w8a8_really_runs_int8():
    model, variables, ids, _ = _linen(True)
    q = jol.quantize(variables, bits=8)
    jaxpr = str(jax.make_jaxpr(lambda q: jol.quantized_apply(model, q, ids, mode="w8a8"))(q))
    assert "preferred_element_type=int32" in jaxpr
    y = jol.quantized_apply(model, q, ids, mode="w8a8")
    y0 = model.apply(variables, ids)
    assert float(jnp.linalg.norm(y - y0) / jnp.linalg.norm(y0)) < 0.05


def test_w8a8_that_intercepts_nothing_raises():
    model, variables, ids, mm = _linen()
    q = jol.quantize(variables, bits=4, granularity="group", group_size=128, model_map=mm)
    with pytest.raises(ValueError, match="no contraction"):
        jol.quantized_apply(model, q, ids, mode="w8a8")


def test_nnx_calibration_and_static_w8a8():
    model, x = fm.nnx_convnet(3)
    scales = jol.calibrate(model, None, [x[:1], x[1:]], method="minmax")
    assert set(scales) == {"convs/0", "convs/1", "head"}
    q = jol.quantize(nnx.state(model, nnx.Param), bits=8)
    y = jol.quantized_apply(model, q, x, mode="w8a8", act_scales=scales)
    y0 = model(x)
    assert float(jnp.linalg.norm(y - y0) / jnp.linalg.norm(y0)) < 0.1


def test_jit_equals_eager_quantized_apply_nnx():
    model, ids = fm.nnx_transformer()
    q = jol.quantize(nnx.state(model, nnx.Param), bits=8)
    eager = jol.quantized_apply(model, q, ids, mode="w8a8")
    jitted = jax.jit(lambda q, i: jol.quantized_apply(model, q, i, mode="w8a8"))(q, ids)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5, rtol=1e-5)


def test_nnx_optimizer_prune_with_map_keeps_kernels_sparse_and_biases_dense():
    import optax
    model, ids = fm.nnx_transformer()
    mm = jol.model_map(model, None, ids)
    tx = optax.chain(optax.adam(1e-3), jol.prune(jol.magnitude_mask, 0.5, model_map=mm))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss(m):
        return jnp.mean(m(ids) ** 2)

    for _ in range(2):
        grads = nnx.grad(loss)(model)
        opt.update(model, grads)
    k = np.asarray(model.blocks[0].attn.query.kernel.value)
    assert (k == 0).sum() == k.size // 2
    assert (np.asarray(model.blocks[0].attn.query.bias.value) != 0).all()
    assert (np.asarray(model.embed.embedding.value) != 0).all()


def test_nnx_qat_fake_quant_with_map_trains():
    import optax
    model, ids = fm.nnx_transformer()
    mm = jol.model_map(model, None, ids)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        fq = jol.fake_quant(p, bits=4, granularity="group", group_size=128, model_map=mm)
        return jnp.mean(nnx.merge(graphdef, fq, rest)(ids) ** 2)

    g = jax.grad(loss)(params)
    gq = g["blocks"][0]["attn"]["query"]["kernel"].value
    assert np.isfinite(np.asarray(gq)).all() and float(jnp.abs(gq).sum()) > 0
    new = optax.apply_updates(params, jax.tree.map(lambda x: -1e-3 * x, g))
    assert float(loss(new)) < float(loss(params)) + 1e-6


def test_bn_fold_accepts_nnx_module():
    model, x = fm.nnx_convnet(3)
    folded = jol.bn_fold(model, x)
    chex.assert_trees_all_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_layer_inputs_of_an_nnx_module_given_only_its_params():
    model, ids = fm.nnx_transformer()
    _, xs = layer_inputs(model, nnx.state(model, nnx.Param), ids)
    key = ("blocks", "0", "attn", "query", "kernel")
    assert xs[key].shape == (ids.size, fm.EMBED)
