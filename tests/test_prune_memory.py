"""Global masks over many leaves need no whole-tree temporaries (XLA's own memory plan).

Each pass of the exact select recomputes its scores from the weights, in leaf order
(``pruning.radix.MakeScores``). Left to itself XLA merged the passes' scores into one
array per leaf, alive across all passes, and built every leaf's histogram digits before
the first count: temporaries as large as the tree (2.2x the tree's bytes in
``benchmarks/scale.py``). The compiled program's temporary size is deterministic, so it
is checked here against the bound the scale benchmark measures: at most two leaves' worth,
however many leaves there are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxopt_lab as jol

ROWS, COLS = 256, 1024  # 1 MiB float32 leaves; 4 of them pass select.SAMPLED_FROM
SLACK = 1 << 20  # histograms (65,792 int32 counters) and scalars


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _tree(leaves: int, sharding=None):
    tree = {f"w{i}": jnp.zeros((ROWS, COLS), jnp.float32) + i for i in range(leaves)}
    return tree if sharding is None else jax.device_put(tree, sharding)


def _mask(tree, previous):
    return jol.magnitude_mask(tree, 0.75, scope="global", previous=previous)


@pytest.mark.parametrize("nested", [False, True], ids=["fresh", "after_a_previous_mask"])
@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "mesh_of_8"])
def test_temporaries_stay_within_two_leaves_whatever_the_leaf_count(nested, on_mesh):
    sharding = None
    share = 1
    if on_mesh:
        devices = np.array(jax.devices()[:8])
        sharding = NamedSharding(Mesh(devices, ("x",)), P("x", None))
        share = devices.size
    leaf_bytes = ROWS * COLS * 4 // share  # per device
    temps = []
    for n in (4, 12):
        tree = _tree(n, sharding)
        previous = jax.tree.map(lambda x: x > 3, tree) if nested else None
        temps.append(_temp_bytes(_mask, tree, previous))
    assert temps[1] <= temps[0] + SLACK, f"temporaries grow with the leaf count: {temps}"
    assert temps[1] <= 2 * leaf_bytes + SLACK, (
        f"{temps[1]} temporary bytes for {leaf_bytes}-byte leaves")
