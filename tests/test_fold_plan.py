"""fold/plan.py: which (layer, BatchNorm) pairs fold. Every BatchNorm is either planned or
skipped with its reason, exactly once; only a layer whose output feeds one BatchNorm alone,
in eval mode, with matching stored shapes, folds."""

import numpy as np
import pytest

from jaxopt_lab.fold import plan as P

F32 = np.dtype(np.float32)


def _layer(name, tag, *, kernel=(3, 3, 1, 8), bias=(8,), axes=(3,)):
    return P.LayerCall((name,), None, tag, axes, kernel, bias, True)


def _bn(name, layer, tag, *, eval_mode=True, axes=(3,), stat=(8,)):
    return P.BNCall((name,), layer, tag, eval_mode, axes, (2, 4, 4, 8), 1e-5, F32, stat,
                    True, True)


def _stored(plans_ok=True):
    def shape(col, path, name):
        if path[0].startswith("Conv"):
            return {"kernel": (3, 3, 1, 8), "bias": (8,)}.get(name)
        return (8,) if plans_ok else (9,)
    return shape


def _plan(layers, bns, uses, stored=None):
    pairs, skipped = P.plan_calls(layers, bns, uses, stored or _stored())
    planned = [p.batch_norm[0] for p in pairs]
    reasons = {s[0]: s[-1] for s in skipped}
    # Every BatchNorm path appears exactly once, planned or skipped.
    assert sorted(planned + list(reasons)) == sorted({b.path[0] for b in bns})
    return pairs, reasons


def test_a_clean_pair_folds_with_broadcast_shapes():
    conv = _layer("Conv_0", "t0")
    pairs, reasons = _plan([conv], [_bn("BatchNorm_0", conv, "b0")], {"t0": (None, ["b0"])})
    assert not reasons and len(pairs) == 1
    p = pairs[0]
    assert p.layer == ("Conv_0",) and p.kernel_shape == (3, 3, 1, 8)
    assert p.kernel_bcast == (8,) and p.bias_bcast == (8,) and p.epsilon == 1e-5


@pytest.mark.parametrize("case, words", [
    ("train", "train"),
    ("no_layer", "not the direct output"),
    ("other_use", "also used elsewhere"),
    ("output_use", "also used elsewhere"),
    ("axes", "feature axes"),
    ("stored", "stored"),
])
def test_pairs_that_must_not_fold_are_skipped_with_the_reason(case, words):
    conv = _layer("Conv_0", "t0")
    bn = _bn("BatchNorm_0", None if case == "no_layer" else conv, "b0",
             eval_mode=case != "train", axes=(1,) if case == "axes" else (3,))
    uses = {"t0": (None, {"other_use": ["b0", "b9"], "output_use": ["b0", "<output>"]}.get(
        case, ["b0"]))}
    pairs, reasons = _plan([conv], [bn], uses, _stored(plans_ok=case != "stored"))
    assert not pairs
    assert words in reasons["BatchNorm_0"], reasons


def test_a_layer_called_more_often_than_it_feeds_the_batchnorm_is_skipped():
    conv = _layer("Conv_0", "t0")
    again = conv._replace(tag="t1")
    uses = {"t0": (None, ["b0"]), "t1": (None, ["<output>"])}
    pairs, reasons = _plan([conv, again], [_bn("BatchNorm_0", conv, "b0")], uses)
    assert not pairs and "called 2 times" in reasons["BatchNorm_0"]


def test_a_layer_called_twice_feeding_two_batchnorms_folds_into_neither():
    conv = _layer("Conv_0", "t0")
    again = conv._replace(tag="t1")
    bns = [_bn("BatchNorm_0", conv, "b0"), _bn("BatchNorm_1", again, "b1")]
    uses = {"t0": (None, ["b0"]), "t1": (None, ["b1"])}
    pairs, reasons = _plan([conv, again], bns, uses)
    assert not pairs
    assert len(reasons) == 2, reasons  # (a layer called twice, each BN fed once)


def test_a_batchnorm_fed_by_different_layers_is_skipped():
    a, b = _layer("Conv_0", "t0"), _layer("Conv_1", "t1")
    bns = [_bn("BatchNorm_0", a, "b0"), _bn("BatchNorm_0", b, "b1")]
    uses = {"t0": (None, ["b0"]), "t1": (None, ["b1"])}
    pairs, reasons = _plan([a, b], bns, uses)
    assert not pairs and "different layers" in reasons["BatchNorm_0"]


def test_tags_are_unique_and_prefixed():
    tags = {P.new_tag() for _ in range(100)}
    assert len(tags) == 100 and all(t.startswith(P.TAG_PREFIX) for t in tags)
