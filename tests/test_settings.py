"""Settings records (quant/settings.py, pruning/settings.py, oneshot/settings.py) and the one
check of per-leaf overrides (`_select.leaf_overrides`): records are frozen, hashable and
keyword-only, check their values, and a record override gives what the equivalent mapping
override gives."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxopt_lab as jol
from jaxopt_lab import _select, oneshot, pruning, quant
from jaxopt_lab.oneshot import GPTQSettings, SparseGPTSettings, WandaSettings
from jaxopt_lab.oneshot import hessian_accumulate, hessian_init

RECORDS = {
    jol.QuantSettings: dict(bits=4, granularity="group", group_size=32, axis=(0, 1)),
    jol.LSQSettings: dict(bits=4, granularity="channel", axis=0, signed=False),
    jol.SparsitySettings: dict(sparsity=0.5),
    jol.NMSettings: dict(n=1, m=4, axis=0),
    GPTQSettings: dict(bits=3, group_size=16, act_order=True, damp=0.1),
    WandaSettings: dict(n=2, m=4, scope="layer"),
    SparseGPTSettings: dict(sparsity=0.5, bits=4, block_size=64),
}
AREAS = {quant: ["LSQSettings", "QuantSettings"], pruning: ["NMSettings", "SparsitySettings"],
         oneshot: ["GPTQSettings", "SparseGPTSettings", "WandaSettings"]}


def _trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("cls", list(RECORDS), ids=lambda c: c.__name__)
def test_records_are_frozen_hashable_and_keyword_only(cls):
    kw = RECORDS[cls]
    a, b = cls(**kw), cls(**kw)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert isinstance(a, _select.SettingsRecord)
    name = next(iter(kw))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(a, name, kw[name])
    with pytest.raises(TypeError):
        cls(*kw.values())
    assert dataclasses.replace(a, **kw) == a


def test_records_normalise_equal_spellings():
    assert jol.QuantSettings(axis=[0, 1], scale_dtype=jnp.float32, dtype=jnp.float8_e4m3fn) \
        == jol.QuantSettings(axis=(0, 1), scale_dtype="float32", dtype="float8_e4m3fn")
    assert jol.QuantSettings(bits=np.int64(4), axis=np.int32(-1)) == jol.QuantSettings(bits=4)
    assert jol.NMSettings(n=np.int8(2), m=np.int64(4)) == jol.NMSettings()
    assert GPTQSettings(symmetric=np.bool_(True), block_size=np.int32(128)) == GPTQSettings()


def test_every_record_is_exported_by_its_area_and_the_top_level():
    for module, names in AREAS.items():
        for name in names:
            assert name in module.__all__ and name in jol.__all__
            assert getattr(module, name) is getattr(jol, name)


_bad_bits = st.one_of(st.integers(-100, 100).filter(lambda b: b not in (2, 3, 4, 8)),
                      st.sampled_from([True, "8", None, 4.5]))


@given(_bad_bits)
def test_bad_bits_raise_naming_the_value(bits):
    for cls in (jol.QuantSettings, jol.LSQSettings, GPTQSettings):
        with pytest.raises(ValueError, match=re.escape(repr(bits))):
            cls(bits=bits)
    if bits is not None:
        with pytest.raises(ValueError, match=re.escape(repr(bits))):
            SparseGPTSettings(bits=bits)


_bad_sparsity = st.one_of(st.floats(allow_nan=True).filter(lambda s: not 0 <= s <= 1),
                          st.sampled_from([-1, 2, "half"]))


@given(_bad_sparsity)
def test_bad_sparsity_raises_naming_the_value(s):
    for make in (lambda: jol.SparsitySettings(sparsity=s), lambda: WandaSettings(sparsity=s),
                 lambda: SparseGPTSettings(sparsity=s)):
        with pytest.raises(ValueError, match=re.escape(repr(s))):
            make()


@pytest.mark.parametrize("make, bad", [
    (lambda v: jol.QuantSettings(granularity=v), "row"),
    (lambda v: jol.QuantSettings(granularity="group", group_size=v), 0),
    (lambda v: jol.QuantSettings(axis=v), "last"),
    (lambda v: jol.QuantSettings(symmetric=v), "yes"),
    (lambda v: jol.QuantSettings(dtype=v), "int4"),
    (lambda v: jol.QuantSettings(scale_dtype=v), "float16"),
    (lambda v: jol.LSQSettings(granularity=v), "group"),
    (lambda v: jol.LSQSettings(signed=v), 1),
    (lambda v: jol.NMSettings(n=5, m=v), 4),
    (lambda v: jol.NMSettings(axis=v), 1.5),
    (lambda v: GPTQSettings(damp=v), -0.5),
    (lambda v: GPTQSettings(block_size=v), 0),
    (lambda v: GPTQSettings(group_size=v), -4),
    (lambda v: GPTQSettings(act_order=v), "no"),
    (lambda v: WandaSettings(scope=v), "global"),
    (lambda v: SparseGPTSettings(n=v, m=4), "two"),
])
def test_bad_values_raise_naming_the_value(make, bad):
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        make(bad)


def test_nm_settings_keep_the_type_error_of_a_non_int_n():
    with pytest.raises(TypeError, match="n must be an int, got 2.0"):
        jol.NMSettings(n=2.0)


_kernels = hnp.arrays(np.float32, (8, 6), elements=st.floats(-4, 4, width=32))


@given(_kernels, _kernels, st.sampled_from([2, 3, 4, 8]),
       st.sampled_from([("channel", None), ("tensor", None), ("group", 4), ("group", 8)]),
       st.booleans())
def test_quantize_record_override_equals_mapping_override(w0, w1, bits, layout, symmetric):
    tree = {"a": jnp.asarray(w0), "b": jnp.asarray(w1)}
    gran, g = layout
    fields = dict(bits=bits, granularity=gran, group_size=g, symmetric=symmetric)
    record = jol.QuantSettings(**fields)
    by_record = jol.quantize(tree, bits=8, where={"a": record, "b": True})
    by_mapping = jol.quantize(tree, bits=8, where=lambda p, x: fields if "a" in
                              _select.path_str(p) else True)
    _trees_equal(by_record, by_mapping)
    assert by_record["a"].bits == bits and by_record["b"].bits == 8
    _trees_equal(jol.fake_quant(tree, where={"a": record, "b": True}),
                 jol.fake_quant(tree, where={"a": fields, "b": True}))


@given(_kernels, st.integers(0, 4), st.floats(0.0, 1.0))
def test_mask_record_override_equals_mapping_override(w, n, s):
    tree = {"a": jnp.asarray(w), "b": jnp.asarray(w[::-1])}
    _trees_equal(jol.nm_mask(tree, where={"a": jol.NMSettings(n=n, m=4), "b": True}),
                 jol.nm_mask(tree, where={"a": {"n": n}, "b": True}))
    for mask_fn in (jol.magnitude_mask, jol.channel_mask):
        _trees_equal(mask_fn(tree, 0.5, where={"a": jol.SparsitySettings(sparsity=s), "b": True}),
                     mask_fn(tree, 0.5, where={"a": {"sparsity": s}, "b": True}))


def _stats(tree, seed=0):
    x = jax.random.normal(jax.random.key(seed), (32, 8))
    return {_select.path_str(p): hessian_accumulate(hessian_init(8), x)
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@given(_kernels, st.sampled_from([2, 4, 8]), st.sampled_from([None, 4]))
def test_oneshot_record_override_equals_mapping_override(w, bits, g):
    tree = {"a": jnp.asarray(w), "b": jnp.asarray(w) * 2}
    stats = _stats(tree)
    where_rec = {"a": GPTQSettings(bits=bits, group_size=g), "b": True}
    where_map = {"a": {"bits": bits, "group_size": g}, "b": True}
    _trees_equal(oneshot.gptq(tree, stats, where=where_rec),
                 oneshot.gptq(tree, stats, where=where_map))
    # The record is the leaf's complete settings: its sparsity=None replaces the call's.
    _trees_equal(oneshot.wanda(tree, stats, sparsity=0.5,
                               where={"a": WandaSettings(n=2, m=4), "b": True}),
                 oneshot.wanda(tree, stats, sparsity=0.5,
                               where={"a": {"sparsity": None, "n": 2, "m": 4}, "b": True}))
    _trees_equal(oneshot.sparsegpt(tree, stats, sparsity=0.5,
                                   where={"a": SparseGPTSettings(sparsity=0.25), "b": True}),
                 oneshot.sparsegpt(tree, stats, sparsity=0.5,
                                   where={"a": {"sparsity": 0.25}, "b": True}))


TREE = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}}
LEAF = re.escape("['Dense_0']['kernel']")


def _kernel_only(choice):
    return lambda p, x: choice if "kernel" in _select.path_str(p) else False


@pytest.mark.parametrize("call, foreign", [
    (lambda w: jol.quantize(TREE, where=w), GPTQSettings()),
    (lambda w: jol.fake_quant(TREE, where=w), GPTQSettings()),
    (lambda w: jol.nm_mask(TREE, where=w), jol.SparsitySettings(sparsity=0.5)),
    (lambda w: jol.magnitude_mask(TREE, 0.5, where=w), jol.NMSettings()),
    (lambda w: jol.channel_mask(TREE, 0.5, where=w), jol.QuantSettings()),
    (lambda w: oneshot.gptq(TREE, _stats(TREE), where=w), jol.QuantSettings()),
    (lambda w: oneshot.wanda(TREE, _stats(TREE), sparsity=0.5, where=w), SparseGPTSettings()),
    (lambda w: oneshot.sparsegpt(TREE, _stats(TREE), sparsity=0.5, where=w), WandaSettings()),
])
def test_unknown_keys_and_foreign_records_raise_naming_the_leaf(call, foreign):
    with pytest.raises(ValueError, match=LEAF + r".*unknown per-leaf setting\(s\) \['bitz'\]"):
        call(_kernel_only({"bitz": 4}))
    with pytest.raises(ValueError, match=LEAF + f".*gave a {type(foreign).__name__}"):
        call(_kernel_only(foreign))


def test_mapping_values_are_checked_naming_the_leaf_and_value():
    with pytest.raises(ValueError, match=LEAF + ".*bits.*got 5"):
        jol.quantize(TREE, where=_kernel_only({"bits": 5}))
    with pytest.raises(ValueError, match=LEAF + ".*sparsity.*got 1.5"):
        jol.magnitude_mask(TREE, 0.5, where=_kernel_only({"sparsity": 1.5}))
    with pytest.raises(ValueError, match=LEAF + ".*damp.*got -1"):
        oneshot.gptq(TREE, _stats(TREE), where=_kernel_only({"damp": -1}))
    with pytest.raises(ValueError, match=LEAF + ".*bits.*got 5"):  # keyword: at the leaf
        oneshot.gptq(TREE, _stats(TREE), bits=5)


def test_a_record_sets_only_the_fields_that_differ_from_the_call():
    # (3, 8) kernel: group_size 8 does not divide its contraction of 3.
    tree = {"first": jnp.ones((3, 8)), "rest": jnp.ones((8, 8))}
    same = jol.QuantSettings(granularity="group", group_size=8)
    with pytest.warns(jol.LayoutFallbackWarning, match="first"):
        q = jol.quantize(tree, granularity="group", group_size=8,
                         where={"first": same, "rest": True})
    assert q["first"].granularity == "channel" and q["rest"].granularity == "group"
    with pytest.raises(ValueError, match="first.*does not divide"):  # a mapping sets it
        jol.quantize(tree, granularity="group", group_size=8,
                     where={"first": {"group_size": 8}, "rest": True})
    # scope="global" takes a record repeating the call's sparsity, not another one.
    masks = jol.magnitude_mask(tree, 0.5, scope="global",
                               where={"first": jol.SparsitySettings(sparsity=0.5), "rest": True})
    assert int(sum(int((~m).sum()) for m in jax.tree.leaves(masks))) == 44
    with pytest.raises(ValueError, match="first.*scope='layer'"):
        jol.magnitude_mask(tree, 0.5, scope="global",
                           where={"first": jol.SparsitySettings(sparsity=0.25), "rest": True})


def test_one_record_as_the_whole_where_applies_to_every_leaf():
    tree = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
    q = jol.quantize(tree, where=jol.QuantSettings(bits=4))
    assert q["a"].bits == q["b"].bits == 4


@given(_kernels, st.sampled_from([2, 3, 4, 8]), st.booleans())
def test_lsq_record_override_equals_mapping_override(w, bits, signed):
    tree = {"a": jnp.asarray(w), "b": jnp.asarray(w) + 1}
    fields = dict(bits=bits, signed=signed, granularity="channel")
    runs = []
    for where in ({"a": jol.LSQSettings(**fields), "b": True}, {"a": fields, "b": True}):
        steps = jol.lsq_init(tree, bits=8, where=where)
        runs.append((steps, jol.lsq_fake_quant(tree, steps, bits=8, where=where)))
    _trees_equal(runs[0], runs[1])
    with pytest.raises(ValueError, match=r"\['a'\].*gave a QuantSettings"):
        jol.lsq_init(tree, where={"a": jol.QuantSettings(), "b": True})
