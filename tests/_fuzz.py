"""Strategies and judging helpers for tests/test_fuzz_public_api.py (not a test module).

Valid and invalid inputs are separate strategies where a fuzz test splits them: a valid
input must give a result that passes every property check (an error fails the test), and an
input invalid by construction must raise (a result fails the test). ``checked()`` and
``error_checked()`` record which happened, so ``pytest --hypothesis-show-statistics`` shows
the share of examples that reached the property checks.

Inputs are built from a few hypothesis draws (shape, dtype, kind of values, a seed) and
filled with NumPy, so one example is cheap and shapes come from small fixed palettes: the
library's jitted internals then compile once per (shape, dtype, settings) and hit the cache
on every later example.

float64: the suite runs with x64 disabled (what users get by default), so float64 leaves are
NumPy float64 arrays, which JAX downcasts to float32 (values beyond float32's range become
inf). "Finite input" is judged on what JAX sees, after that documented downcast.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import event
from hypothesis import strategies as st

import jaxopt_lab as jol

EXAMPLES = 200  # per fuzz test, as issue 7 asks
ALLOWED_ERRORS = (ValueError, TypeError)

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float32),
                np.dtype(np.float64))
INT_DTYPES = (np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.uint8), np.dtype(bool))
KINDS = ("normal", "zeros", "constant", "huge", "tiny", "subnormal", "nan", "inf", "neg_zero",
         "wide")
FINITE_KINDS = tuple(k for k in KINDS if k not in ("nan", "inf"))
MOSTLY_FINITE = FINITE_KINDS * 3 + ("nan", "inf")  # so that most examples get past validation
# Kernels (ndim >= 2, what the default `where` selects) and everything else.
KERNEL_SHAPES = ((1, 4), (4, 4), (2, 2, 4))
OTHER_SHAPES = ((), (0,), (4,), (0, 4), (4, 0))
SHAPES = KERNEL_SHAPES + OTHER_SHAPES


# --- values -----------------------------------------------------------------------------


def fill(shape, dtype, kind: str, seed: int) -> np.ndarray:
    """A NumPy array of ``shape``/``dtype`` holding values of the given ``kind``."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        if dtype == np.dtype(bool):
            return rng.random(shape) < 0.5
        info = np.iinfo(dtype)
        if kind == "zeros":
            return np.zeros(shape, dtype)
        if kind == "constant":
            return np.full(shape, rng.integers(info.min, info.max, endpoint=True), dtype)
        if kind == "huge":
            return rng.choice(np.array([info.min, info.max], dtype), size=shape)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    info = jnp.finfo(dtype)
    top = float(info.max)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    if kind == "zeros":
        x = np.zeros(shape)
    elif kind == "neg_zero":
        x = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
    elif kind == "constant":
        x = np.full(shape, rng.standard_normal() * 10.0 ** rng.uniform(-3, 3))
    elif kind == "huge":
        x = sign * top * rng.uniform(0.25, 1.0, shape)
    elif kind == "tiny":
        x = sign * float(info.tiny) * rng.uniform(1.0, 4.0, shape)
    elif kind == "subnormal":
        x = sign * float(info.smallest_subnormal) * rng.integers(1, 8, shape)
    elif kind == "wide":  # magnitudes spread over the whole exponent range
        lo, hi = math.log10(float(info.tiny)), math.log10(top)
        x = sign * 10.0 ** rng.uniform(lo, hi, shape)
    else:
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3)
    x = np.clip(x, -top, top)
    if kind in ("nan", "inf") and x.size:
        bad = rng.random(shape) < 0.3
        bad.reshape(-1)[rng.integers(x.size)] = True
        x = np.where(bad, np.nan if kind == "nan" else sign * np.inf, x)
    with np.errstate(over="ignore"):
        return x.astype(dtype)


@st.composite
def arrays(draw, shapes=SHAPES, dtypes=FLOAT_DTYPES + INT_DTYPES, kinds=KINDS, as_jax=None):
    """One array: NumPy or jax (float64 stays NumPy: JAX would silently make it float32)."""
    shape = draw(st.sampled_from(shapes))
    dtype = draw(st.sampled_from(dtypes))
    x = fill(shape, dtype, draw(st.sampled_from(kinds)), draw(st.integers(0, 2**16)))
    use_jax = draw(st.booleans()) if as_jax is None else as_jax
    if use_jax and dtype != np.float64:
        return jnp.asarray(x)
    return x


def pick(options):
    """``sampled_from`` with uniform odds: hypothesis favours some entries of a sampled list
    (its simplest, and boundary cases), which can starve the valid path of a test."""
    options = tuple(options)
    return st.integers(0, 2**16).map(lambda i: options[np.random.default_rng(i).integers(
        len(options))])


@st.composite
def like(draw, x, dtypes=FLOAT_DTYPES, kinds=KINDS):
    """An array with the shape of ``x`` (values and dtype drawn afresh)."""
    return fill(np.shape(x), draw(st.sampled_from(dtypes)), draw(st.sampled_from(kinds)),
                draw(st.integers(0, 2**16)))


@st.composite
def trees(draw, leaves=None, allow_scalars=True):
    """A pytree of arrays in one of several layouts (bare leaf, dicts, lists, tuples, None)."""
    leaf = leaves if leaves is not None else arrays()
    layout = draw(st.integers(0, 5))
    if layout == 0:
        return draw(leaf)
    if layout == 1:
        return {"kernel": draw(leaf), "bias": draw(leaf)}
    if layout == 2:
        return {"Dense_0": {"kernel": draw(leaf), "bias": draw(leaf)}, "rest": [draw(leaf)]}
    if layout == 3:
        return (draw(leaf), None, {"w": draw(leaf)})
    if layout == 4 and allow_scalars:
        return {"w": draw(leaf), "step": draw(st.sampled_from([0, 1.5, True]))}
    return [draw(leaf) for _ in range(draw(st.integers(1, 3)))]


# --- judging ------------------------------------------------------------------------------


def attempt(fn, *args, **kwargs):
    """``(result, None)``, or ``(None, error)`` for a ValueError/TypeError with a message.

    Any other exception propagates and fails the test (hypothesis then shrinks the input).
    """
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        result = fn(*args, **kwargs)
    except ALLOWED_ERRORS as e:
        assert str(e).strip(), f"{type(e).__name__} without a message from {name}"
        event(f"{name}: {type(e).__name__}")
        return None, e
    event(f"{name}: returned")
    return result, None


def checked() -> None:
    """Counts an example whose result went through every property check."""
    event("properties checked")


def error_checked() -> None:
    """Counts an example invalid by construction whose error was checked."""
    event("invalid input: error checked")


def raises(fn, *args, **kwargs) -> Exception:
    """The ValueError/TypeError (with a message) ``fn`` must raise; a result fails the test."""
    result, err = attempt(fn, *args, **kwargs)
    assert err is not None, f"{getattr(fn, '__name__', fn)} accepted invalid input: {result!r}"
    error_checked()
    return err


def jax_view(x) -> np.ndarray:
    """The values JAX computes with (float64 downcast to float32 without x64)."""
    x = np.asarray(x)
    if x.dtype == np.float64 and not jax.config.jax_enable_x64:
        with np.errstate(over="ignore"):
            return x.astype(np.float32)
    return x


def ftz(x: np.ndarray) -> np.ndarray:
    """``x`` with float32 subnormals flushed to zero, as XLA on CPU computes."""
    tiny = np.finfo(np.float32).tiny
    return np.where(np.abs(x) < tiny, np.zeros_like(x), x)


def is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def all_finite(*trees_) -> bool:
    """True when every float leaf (as JAX sees it) and Python float is finite."""
    for leaf in jax.tree.leaves(trees_):
        if isinstance(leaf, float) and not math.isfinite(leaf):
            return False
        if is_float(leaf) and not np.isfinite(jax_view(leaf).astype(np.float32)).all():
            return False
    return True


def canonical_dtype(dtype) -> np.dtype:
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def same_bits(a, b) -> bool:
    """Bitwise equality (NaN payloads and -0.0 included), dtype and shape too."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize in (1, 2, 4, 8) and a.dtype != bool:
        view = np.dtype(f"u{a.dtype.itemsize}")
        return bool(np.array_equal(a.view(view), b.view(view)))
    return bool(np.array_equal(a, b))


def leaf_paths(tree, is_leaf=None) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [jol._select.path_str(p) for p, _ in flat]


def names_a_leaf(err: Exception, tree) -> bool:
    """The message names one of the tree's leaf paths (``<root>`` for a bare array)."""
    text = str(err)
    return any(p in text for p in leaf_paths(tree))


def float32_abs_scores(x) -> np.ndarray:
    """|x| in float32 with NaN above +inf: the documented magnitude ranking."""
    a = np.abs(jax_view(x).astype(np.float32)).astype(np.float64)
    return np.where(np.isnan(a), np.inf, a) + np.isnan(a)


# --- trees with kernels, valid and not ------------------------------------------------

# Kernels every valid setting accepts: ndim >= 2, every axis even (group_size 2 divides).
VALID_KERNEL_SHAPES = ((2, 4), (4, 4), (2, 2, 4))


def finite_kernels(dtypes=FLOAT_DTYPES):
    """Float kernels whose values are finite as JAX sees them (float64 beyond float32's
    range becomes inf: such draws are not valid input and are filtered out)."""
    return arrays(shapes=VALID_KERNEL_SHAPES, dtypes=dtypes, kinds=FINITE_KINDS).filter(
        all_finite)


def unselected_leaves():
    """Leaves the default ``where`` (and ``where_kernels_named``) never selects: float
    scalars and vectors (NaN and Inf included: untouched, so valid), and integer arrays."""
    return st.one_of(arrays(shapes=((), (0,), (4,)), kinds=KINDS),
                     arrays(shapes=KERNEL_SHAPES + ((0, 4),), dtypes=INT_DTYPES))


@st.composite
def kernel_trees(draw, kernels=None, others=None):
    """A pytree holding at least one kernel (at a path naming ``kernel``)."""
    kernels = finite_kernels() if kernels is None else kernels
    others = unselected_leaves() if others is None else others
    layout = draw(st.integers(0, 3))
    if layout == 0:
        return {"kernel": draw(kernels)}
    if layout == 1:
        return {"kernel": draw(kernels), "bias": draw(others)}
    if layout == 2:
        return {"Dense_0": {"kernel": draw(kernels), "bias": draw(others)},
                "Dense_1": {"kernel": draw(kernels)}, "rest": [draw(others)]}
    return ({"kernel": draw(kernels)}, None,
            {"w": draw(others), "step": draw(st.sampled_from([0, 1.5, True]))})


BAD_PATH = "['Dense_bad']['kernel']"


@st.composite
def trees_with_a_bad_kernel(draw):
    """A valid kernel tree plus one kernel at ``BAD_PATH`` that no setting can take: NaN or
    Inf among its values, or no elements."""
    if draw(st.booleans()):
        bad = draw(arrays(shapes=VALID_KERNEL_SHAPES, dtypes=FLOAT_DTYPES, kinds=("nan", "inf")))
    else:
        bad = draw(arrays(shapes=((0, 4), (4, 0)), dtypes=FLOAT_DTYPES))
    return {"Dense_bad": {"kernel": bad}, "ok": draw(kernel_trees())}


# --- `where` arguments ----------------------------------------------------------------


def where_all(path, leaf):
    del path
    return hasattr(leaf, "shape")


def where_floats(path, leaf):
    del path
    return is_float(leaf)


def where_kernels_named(path, leaf):
    return "kernel" in jol._select.path_str(path) and is_float(leaf) and np.ndim(leaf) >= 2


WHERES = (None, where_all, where_floats, where_kernels_named)
