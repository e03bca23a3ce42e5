"""One-shot methods on a stock-layer transformer through the model map and its capture."""

import functools

import jax.numpy as jnp
import numpy as np

import _flax_models as fm
import jaxopt_lab as jol
from jaxopt_lab.core.capture import layer_inputs
from jaxopt_lab.oneshot import calibration_stats, gptq, sparsegpt, wanda


@functools.cache
def _setup():
    model, variables, ids = fm.linen_transformer()
    mm = jol.model_map(model, variables, ids)
    batches = [fm.token_ids(seed=s) for s in range(3)]
    return model, variables, mm, batches, calibration_stats(model, variables, batches)


def test_stats_cover_every_kernel_and_equal_the_captured_gram():
    model, variables, mm, batches, stats = _setup()
    kernels = {k for k, v in mm.items() if v.role == "kernel"}
    # Every kernel, plus the tied embedding as the attend head's contraction sees it.
    assert set(stats) == kernels | {("params", "Embed_0", "embedding")}
    key = ("params", "LinenBlock_0", "MultiHeadDotProductAttention_0", "out", "kernel")
    xs = [layer_inputs(model, variables, b)[1][key] for b in batches]
    x = jnp.concatenate(xs)
    np.testing.assert_allclose(stats[key].xtx, x.T @ x, rtol=2e-4, atol=2e-3)
    assert stats[key].xtx.shape == (fm.HEADS * fm.HEAD_DIM,) * 2  # the real contraction


def test_gptq_with_the_map_beats_rtn_on_every_attention_kernel():
    model, variables, mm, batches, stats = _setup()
    params = variables["params"]
    q = gptq(params, stats, bits=4, group_size=32, model_map=mm)
    rtn = jol.quantize(params, bits=4, granularity="group", group_size=32, model_map=mm)
    for names, st in stats.items():
        if "MultiHeadDotProductAttention_0" not in names:
            continue
        sub = functools.reduce(lambda t, k: t[k], names[1:], params)
        qg = functools.reduce(lambda t, k: t[k], names[1:], q)
        qr = functools.reduce(lambda t, k: t[k], names[1:], rtn)
        info = mm[names]
        assert qg.group_axis == info.contracting == qr.group_axis

        def err(qt, w=sub, info=info, st=st):
            d = jnp.transpose(qt.dequantize() - w, info.contracting + info.outputs)
            d = d.reshape(st.xtx.shape[0], -1)
            return float(jnp.trace(d.T @ st.xtx @ d))
        assert err(qg) <= err(qr) * 1.0001, names


def test_sparsegpt_and_wanda_masks_with_the_map_are_exact_and_2_4_along_the_contraction():
    _, variables, mm, _, stats = _setup()
    params = variables["params"]
    _, masks = sparsegpt(params, stats, n=2, m=4, model_map=mm)
    wm = wanda(params, stats, sparsity=0.5, model_map=mm)
    q = np.asarray(masks["LinenBlock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    assert (q.reshape(fm.EMBED // 4, 4, -1).sum(axis=1) == 2).all()
    w = np.asarray(wm["LinenBlock_0"]["DenseGeneral_0"]["kernel"])
    assert (~w).sum() == w.size // 2
    assert np.asarray(wm["Embed_0"]["embedding"]).all()  # not a kernel: untouched
