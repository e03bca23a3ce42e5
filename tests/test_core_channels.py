"""Channel flow read from the jaxpr: edges between kernels, leaves on their channels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxopt_lab.core import channels, flax_hooks
from jaxopt_lab.core.mapping import path_names
from tests import _flax_models as F


def flow_of(model, variables, *args):
    program = flax_hooks.trace(model, variables, *args)
    flow = channels.channel_flow(program, zeroable=range(program.n_vars))
    names = ["/".join(n for n in path_names(p) if n != "params") for p in program.paths]
    return flow, names


def edges(flow, names):
    return {(names[p], a): [(names[e.consumer], e.consumer_axis, e.outer, e.inner, e.zero)
                            for e in es] for (p, a), es in flow.edges.items()}


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_conv_net_edges_and_batch_norm_leaves(api):
    if api == "linen":
        model, v, x = F.linen_convnet(3)
        conv, bn, head = "Conv_{}/kernel", "BatchNorm_0", "Dense_0/kernel"
    else:
        (model, x), v = F.nnx_convnet(3), None
        conv, bn, head = "convs/{}/kernel", "bns/0", "head/kernel"
    flow, names = flow_of(model, v, x)
    got = edges(flow, names)
    assert got[(conv.format(0), 3)] == [(conv.format(1), 2, 1, 1, True)]
    assert got[(conv.format(1), 3)] == [(head, 0, 1, 1, True)]
    k0 = names.index(conv.format(0))
    attached = {names[leaf].split("/")[-1] for leaf, _ in flow.attached[(k0, 3)]}
    assert attached == {"mean", "var", "scale", "bias"}
    assert all(bn in names[leaf] for leaf, _ in flow.attached[(k0, 3)])
    assert flow.why_not((k0, 3)) is None
    assert flow.why_not((names.index(head), 1)) == channels.OUTPUT


def test_channels_last_flatten_gives_outer_rows():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(3, (3, 3), name="conv")(x))
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(2, name="head")(x)

    x = jnp.ones((1, 4, 5, 2))
    flow, names = flow_of(Net(), Net().init(jax.random.PRNGKey(0), x), x)
    assert edges(flow, names)[("conv/kernel", 3)] == [("head/kernel", 0, 20, 1, True)]


@pytest.mark.parametrize("act,zero", [(nn.relu, True), (nn.gelu, True), (nn.tanh, True),
                                      (nn.sigmoid, False), (lambda h: h + 1.0, False)])
def test_dead_channels_stay_zero_only_through_zero_preserving_ops(act, zero):
    model = nn.Sequential([nn.Dense(4), act, nn.Dense(2)])
    x = jnp.ones((1, 3))
    flow, names = flow_of(model, model.init(jax.random.PRNGKey(0), x), x)
    assert edges(flow, names)[("layers_0/kernel", 1)][0][-1] is zero
    assert (flow.why_not((names.index("layers_0/kernel"), 1)) is None) is zero


def test_attention_residual_and_tied_embedding_are_blocked():
    module, ids = F.nnx_transformer()
    flow, names = flow_of(module, None, ids)

    def why(name, axis):
        return flow.why_not((names.index(name), axis))

    assert "attention" in why("blocks/0/attn/query/kernel", 2)
    assert "residual" in why("blocks/0/down/kernel", 2)
    assert "tied embedding" in why("head/kernel", 1)
    assert why("blocks/0/up/kernel", 1) is None and why("blocks/0/up/kernel", 2) is None
    up = edges(flow, names)[("blocks/0/up/kernel", 2)]
    assert up == [("blocks/0/down/kernel", 1, 1, 1, True)]
    assert isinstance(module, nnx.Module)
