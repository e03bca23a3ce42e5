"""The shared jaxpr walker (core/jaxpr_walk.py): what every analysis gets from the walk
itself -- sub-jaxprs stepped into, leaf reads counted once per op (views and calls not
counted), the fallback that loses an activation's tags with "<op> reads it" -- and the
reshape grouping both analyses follow channels through."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.core import flax_hooks, jaxpr_walk
from jaxopt_lab.core.jaxpr_walk import MODEL_INPUT, Static


@dataclasses.dataclass(frozen=True)
class _Act:
    tags: tuple


class _ViewsOnly(jaxpr_walk.Walker):
    """An analysis with rules for leaf views only: everything else hits the fallback."""

    def __init__(self):
        super().__init__()
        self.blocked: list[tuple[str, str]] = []

    def step(self, eqn, vals):
        x = vals[0] if vals else None
        if isinstance(x, Static):
            moved = jaxpr_walk.moved_axes(eqn, list(x.leaves), frozenset())
            if moved is not None:
                return [Static(tuple(moved), x.zero, x.pure)]
        return None

    def block(self, tags, reason):
        self.blocked += [(t, reason) for t in tags if t is not None]

    def lost(self, rank, reason):
        return _Act(("input",) * rank if reason == MODEL_INPUT else (None,) * rank)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (4, 3))
        h = jax.jit(lambda a, v: jnp.sin(a @ v.T))(x, w)  # a sub-jaxpr: stepped into
        return h, w * 2.0, jnp.zeros((2,)) * w[0, :2]


def _program():
    x = jnp.ones((5, 3))
    return flax_hooks.trace(_Net(), _Net().init(jax.random.PRNGKey(0), x), x)


def test_walk_counts_leaf_reads_steps_into_calls_and_loses_unknown_ops():
    program = _program()
    walker = _ViewsOnly()
    outs = walker.walk(program)
    (w,) = range(program.n_vars)
    # dot_general (through the transpose view, inside the jit), mul, and the slice.
    assert walker.leaf_uses[w] == 3
    assert {t for t, _ in walker.blocked} == {"input"}
    assert {r for _, r in walker.blocked} == {"dot_general reads it"}
    h, doubled, _ = outs
    assert h == _Act((None, None))  # sin of a lost activation: lost too
    assert doubled == Static.blank(2)  # no rule for mul: a plain static value


def test_walk_marks_zeroable_leaves_zero():
    program = _program()
    seen = []

    class Spy(_ViewsOnly):
        def step(self, eqn, vals):
            seen.extend(v for v in vals if isinstance(v, Static) and v.pure is not None)
            return super().step(eqn, vals)

    Spy().walk(program, zeroable=[0])
    assert seen and all(v.zero for v in seen)
    seen.clear()
    Spy().walk(program)
    assert seen and not any(v.zero for v in seen)


def test_leaf_view_and_blank():
    s = Static((frozenset({(0, 1)}), frozenset()), pure=0)
    assert jaxpr_walk.leaf_view(s) == [1, None]
    assert jaxpr_walk.leaf_view(Static((frozenset({(0, 1), (1, 0)}),), pure=0)) is None
    assert jaxpr_walk.leaf_view(Static.blank(2)) is None
    assert jaxpr_walk.leaf_view(_Act((None,))) is None
    assert jaxpr_walk.per_axis(s) == (False, list(s.leaves), frozenset())
    assert jaxpr_walk.per_axis(_Act((None, "t"))) == (True, [None, "t"], None)


@st.composite
def _reshapes(draw):
    """A shape and a reshape of it: each group of adjacent axes merged, kept, or split
    the other way round (with a size-1 axis added)."""
    groups = draw(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3),
                           min_size=1, max_size=4))
    new = []
    for g in groups:
        n = math.prod(g)
        new.append(draw(st.sampled_from([[n], list(g), [1, *g[::-1]]])))
    return [s for g in groups for s in g], [s for g in new for s in g]


@given(_reshapes())
def test_reshape_groups_cover_every_axis_with_equal_sizes(case):
    old, new = case
    groups = jaxpr_walk.reshape_groups(old, new)
    assert groups is not None
    assert [a for go, _ in groups for a in go] == [i for i, s in enumerate(old) if s != 1]
    assert [a for _, gn in groups for a in gn] == [j for j, s in enumerate(new) if s != 1]
    for go, gn in groups:
        assert math.prod(old[a] for a in go) == math.prod(new[a] for a in gn)


def test_reshape_groups_put_crossing_axes_in_one_group():
    assert jaxpr_walk.reshape_groups((2, 3), (3, 2)) == [([0, 1], [0, 1])]
    assert jaxpr_walk.reshape_groups((4, 6, 5), (8, 3, 5)) == [([0, 1], [0, 1]), ([2], [2])]
    assert jaxpr_walk.reshape_groups((2, 1, 3), (6,)) == [([0, 2], [0])]
