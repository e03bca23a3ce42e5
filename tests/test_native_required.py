"""Where the native int8 kernels can be built, they must be: a build failure is a failure.

``tests/test_quant_native.py`` skips its kernel tests when the kernel is unavailable, which
is right on a CPU without AVX512-VNNI or without a compiler, but would turn a broken build
on a machine that has both into a silent skip and a silent XLA fallback. Here, on such a
machine, the kernel must report ``"ok"``, be what jitted ``int8_matmul`` and
``float_int8_matmul`` lower to, and compute the same as XLA. Only the public functions of
``jaxopt_lab.quant.native`` are used; the CPU and compiler checks are this file's own.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_lab.quant import native

REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _why_not_required() -> str | None:
    """Why this machine need not build the kernel, or None when it must."""
    if jax.default_backend() != "cpu":
        return f"default backend is {jax.default_backend()}, the kernels are CPU-only"
    missing = [f for f in REQUIRED_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"CPU lacks {', '.join(missing)}"
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        return "no C++ compiler ($CXX, g++ or c++)"
    if os.environ.get("JAXOPT_LAB_NATIVE_INT8", "1") == "0":
        return "switched off on purpose with JAXOPT_LAB_NATIVE_INT8=0"
    return None


REASON = _why_not_required()
required = pytest.mark.skipif(REASON is not None, reason=f"native kernel not required: {REASON}")


def _lowered(fn, *args) -> str:
    # A fresh jit per call: use_native_int8 acts at trace time.
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


@required
def test_kernel_is_built_where_it_can_be():
    status = native.native_int8_status()
    assert status == "ok", f"AVX512-VNNI CPU with a compiler, but the kernel failed: {status}"
    assert native.native_int8_available()


@required
def test_int8_matmul_runs_the_kernel_and_matches_xla():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.integers(-128, 128, (5, 70)), jnp.int8)
    b = jnp.asarray(rng.integers(-128, 128, (70, 65)), jnp.int8)
    assert "custom_call" in _lowered(native.int8_matmul, a, b), "jitted int8_matmul fell back"
    got = jax.jit(native.int8_matmul)(a, b)
    with native.use_native_int8(False):
        assert "custom_call" not in _lowered(native.int8_matmul, a, b)
        want = jax.jit(lambda x, y: native.int8_matmul(x, y))(a, b)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(a, np.int64) @ np.asarray(b,
                                                                                       np.int64))


@required
def test_float_int8_matmul_runs_the_kernel_and_matches_xla():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
    b = jnp.asarray(rng.integers(-127, 128, (40, 130)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.01, 0.1, (130,)), jnp.float32)
    assert "custom_call" in _lowered(native.float_int8_matmul, a, b, scale), (
        "jitted float_int8_matmul fell back")
    got = jax.jit(native.float_int8_matmul)(a, b, scale)
    with native.use_native_int8(False):
        assert "custom_call" not in _lowered(native.float_int8_matmul, a, b, scale)
    want = np.asarray(a, np.float64) @ (np.asarray(b, np.float64) * np.asarray(scale, np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
