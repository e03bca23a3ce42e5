"""Native int8 matmuls for CPUs with AVX512-VNNI, called from jitted code via ``jax.ffi``.

XLA's CPU backend runs ``dot_general(int8, int8) -> int32`` no faster than float32 (it
does not use the VNNI instructions), so int8 compute alone would not speed anything up.
`int8_matmul` uses a small hand-written kernel (``int8_gemm.cc``: exact int32 results,
several times the throughput of XLA's int8 or float32 dot on such CPUs). For weight-only
quantization, XLA dequantizes a whole weight into a per-call temporary before its float
dot (48 MiB for a 1024-4096-1024 MLP, allocated and page-faulted on every call), which
made weight-only int8 slower than float32; `float_int8_matmul` dequantizes one 64-column
panel at a time inside a float32 matmul kernel instead. Both kernels are used when

* the computation runs on CPU (``lax.platform_dependent``: GPU/TPU keep XLA's dot),
* the CPU has AVX512-F/BW/VNNI (read from ``/proc/cpuinfo``),
* a C++ compiler (``$CXX`` or ``g++``) builds the kernel; the library is cached under
  ``$JAXOPT_LAB_CACHE`` (default ``~/.cache/jaxopt_lab``), keyed by the source hash,
* and it is not switched off (``JAXOPT_LAB_NATIVE_INT8=0`` or `use_native_int8(False)`).

Otherwise `int8_matmul` is exactly ``lax.dot_general(..., preferred_element_type=int32)``,
bit-identical to the kernel, and `float_int8_matmul` is XLA's dot on the dequantized
weight, equal to the kernel up to summation order.

Examples:
  >>> import jax.numpy as jnp
  >>> a = jnp.array([[1, -2, 3]], jnp.int8)
  >>> b = jnp.array([[1, 0], [0, 1], [-128, 127]], jnp.int8)
  >>> int8_matmul(a, b).tolist()
  [[-383, 379]]
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax import lax

_SOURCE = pathlib.Path(__file__).with_name("int8_gemm.cc")
_TARGET = "jaxopt_lab_int8_matmul"
_FLOAT_TARGET = "jaxopt_lab_float_int8_matmul"
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
_enabled = os.environ.get("JAXOPT_LAB_NATIVE_INT8", "1") != "0"


def _cpu_supports_vnni() -> bool:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return all(f in flags for f in _REQUIRED_FLAGS)


def _build() -> pathlib.Path:
    """Compiles the kernel once per source version; returns the shared library's path."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    digest = hashlib.sha256(_SOURCE.read_bytes() + jax.__version__.encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("JAXOPT_LAB_CACHE",
                                        pathlib.Path.home() / ".cache" / "jaxopt_lab"))
    lib = cache / f"int8_gemm-{digest}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw",
           "-mavx512vnni", f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, lib)  # atomic: concurrent builders never see a partial file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def native_int8_status() -> str:
    """``"ok"`` if the native kernel is registered, else why not (built on first call)."""
    if not _cpu_supports_vnni():
        return "CPU lacks AVX512-VNNI"
    try:
        lib = ctypes.CDLL(str(_build()))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JolInt8Matmul),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_FLOAT_TARGET,
                                    jax.ffi.pycapsule(lib.JolFloatInt8Matmul), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"native int8 kernel unavailable: {detail.strip()[:500]}"
    return "ok"


def native_int8_available() -> bool:
    """True when `int8_matmul` will use the native kernel on CPU."""
    return _enabled and native_int8_status() == "ok"


@contextlib.contextmanager
def use_native_int8(enabled: bool):
    """Switches the native kernel on or off for code *traced* inside the block.

    ``jax.jit`` caches traces: use a jitted function first called inside the block.
    """
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = old


_CONTRACTION_MULTIPLE = 4


def xla_int8_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
    """XLA's exact ``int8 x int8 -> int32`` ``dot_general``, safe off CPU.

    Off CPU the operands go through `pad_contraction` first: XLA's GPU backend (jax
    0.11.2, measured on an H200) returns *twice* the true sums for int8 contractions whose
    length is not a multiple of 4 (5, 7...), batched or not.
    """
    def plain(lhs, rhs):
        return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.int32)

    (lc, _), _ = dimension_numbers
    if not lc or lhs.shape[lc[-1]] % _CONTRACTION_MULTIPLE == 0:
        return plain(lhs, rhs)
    return lax.platform_dependent(
        lhs, rhs, cpu=plain,
        default=lambda lhs, rhs: plain(*pad_contraction(lhs, rhs, dimension_numbers)))


def pad_contraction(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                    multiple: int = _CONTRACTION_MULTIPLE) -> tuple[jax.Array, jax.Array]:
    """Both operands zero-padded along their last contracted axis to a multiple of
    ``multiple`` (unchanged when it already is one): zeros add nothing to the sums."""
    (lc, rc), _ = dimension_numbers
    extra = (-lhs.shape[lc[-1]]) % multiple if lc else 0
    if extra == 0:
        return lhs, rhs

    def pad(x, axis):
        return jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])

    return pad(lhs, lc[-1]), pad(rhs, rc[-1])


def int8_matmul(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike) -> jax.Array:
    """Exact ``(M, K) @ (K, N)`` of ``int8`` matrices with ``int32`` results.

    Uses the native VNNI kernel on CPU when available (see the module docstring), XLA's
    ``dot_general`` everywhere else. Raises ``TypeError`` for non-int8 or non-2-D input.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.dtype != jnp.int8 or b.dtype != jnp.int8 or a.ndim != 2 or b.ndim != 2 \
            or a.shape[1] != b.shape[0]:
        raise TypeError(f"int8_matmul needs int8 (M, K) and (K, N) matrices, got "
                        f"{a.dtype}{a.shape} and {b.dtype}{b.shape}")

    def xla(a, b):
        return xla_int8_dot_general(a, b, (((1,), (0,)), ((), ())))

    if not native_int8_available() or a.size == 0 or b.size == 0:
        return xla(a, b)

    def native(a, b):
        out = jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.int32)
        return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(a, b)

    return lax.platform_dependent(a, b, cpu=native, default=xla)


def float_int8_matmul(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike,
                      scale: jax.typing.ArrayLike) -> jax.Array:
    """``a @ (b * scale)`` for float32 ``(M, K)`` activations, int8 ``(K, N)`` weight codes
    and float32 ``(N,)`` per-column scales: weight-only quantized compute.

    The weights are exactly ``dequantize``'s (``float32(code) * scale``). On CPU with the
    native kernel (see the module docstring) they are produced one 64-column panel at a
    time inside the matmul, so the dequantized matrix is never written out; the result
    then differs from XLA's float dot only in summation order. Elsewhere it is XLA's
    ``dot_general`` on the dequantized codes. Raises ``TypeError`` for other dtypes or
    shapes.
    """
    a, b, scale = jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale)
    if (a.dtype != jnp.float32 or b.dtype != jnp.int8 or scale.dtype != jnp.float32
            or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]
            or scale.shape != (b.shape[1],)):
        raise TypeError(f"float_int8_matmul needs float32 (M, K), int8 (K, N) and float32 "
                        f"(N,), got {a.dtype}{a.shape}, {b.dtype}{b.shape} and "
                        f"{scale.dtype}{scale.shape}")

    def xla(a, b, scale):
        return lax.dot_general(a, b.astype(jnp.float32) * scale[None],
                               (((1,), (0,)), ((), ())))

    if not native_int8_available() or a.size == 0 or b.size == 0:
        return xla(a, b, scale)

    def native(a, b, scale):
        out = jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32)
        return jax.ffi.ffi_call(_FLOAT_TARGET, out, vmap_method="sequential")(a, b, scale)

    return lax.platform_dependent(a, b, scale, cpu=native, default=xla)
