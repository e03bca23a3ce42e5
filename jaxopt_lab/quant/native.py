"""Native int8 and weight-only matmuls for AVX-512 CPUs, called from jitted code via ``jax.ffi``.

XLA's CPU backend runs ``dot_general(int8, int8) -> int32`` no faster than float32 (it
does not use the VNNI instructions), so int8 compute alone would not speed anything up.
`int8_matmul` uses a small hand-written kernel (``int8_gemm.cc``: exact int32 results,
several times the throughput of XLA's int8 or float32 dot on such CPUs). For weight-only
quantization, XLA dequantizes a whole weight into a per-call temporary before its float
dot (48 MiB for a 1024-4096-1024 MLP, allocated and page-faulted on every call), which
made weight-only int8 slower than float32; `float_int8_matmul` and
`weight_only_matmul_codes` (int8 or packed int4 codes, per-channel or group scales,
symmetric or not) never write the dequantized weight (``weight_only.cc``: a GEMV that reads
the packed codes once at batch 1, a panel-by-panel dequantizing GEMM above). The kernels
are used when

* the computation runs on CPU (``lax.platform_dependent``: GPU/TPU keep XLA's dot),
* the CPU has AVX-512 F/BW/VL, and VNNI for `int8_matmul` (read from ``/proc/cpuinfo``),
* the native library exists: built by ``setup.py`` when the package is installed
  (``_jol_native*.so`` next to this file) or, in a checkout without it, compiled on first
  use with ``$CXX`` or ``g++`` and cached under ``$JAXOPT_LAB_CACHE`` (default
  ``~/.cache/jaxopt_lab``), keyed by the source hash. Without either, a ``RuntimeWarning``
  says why once and XLA runs instead;
* and they are not switched off (``JAXOPT_LAB_NATIVE_INT8=0`` or `use_native_int8(False)`).

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
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HERE = pathlib.Path(__file__).parent
_SOURCES = ("int8_gemm.cc", "weight_only.cc")
_HEADERS = ("native_panels.h",)
# Built by setup.py when the package is installed (see `build_native`).
PREBUILT = "_jol_native"
_TARGET = "jaxopt_lab_int8_matmul"
_WEIGHT_ONLY_TARGET = "jaxopt_lab_weight_only_matmul"
_INT8_CONV_TARGET = "jaxopt_lab_int8_conv"
_WEIGHT_ONLY_CONV_TARGET = "jaxopt_lab_weight_only_conv"
_INT8_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
_WEIGHT_ONLY_FLAGS = ("avx512f", "avx512bw", "avx512vl")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw",
                 "-mavx512vl", "-mavx512vnni")
_enabled = os.environ.get("JAXOPT_LAB_NATIVE_INT8", "1") != "0"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def build_native(output: str | os.PathLike, *, cxx: str | None = None,
                 include_dir: str | None = None) -> None:
    """Compiles the native kernels into the shared library ``output``.

    Called by ``setup.py`` at install time and, for a checkout without that library, by
    the first use (cached). Raises ``RuntimeError`` without a compiler and
    ``subprocess.CalledProcessError`` when compiling fails.
    """
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    include_dir = include_dir or jax.ffi.include_dir()
    cmd = [cxx, *COMPILE_FLAGS, f"-I{include_dir}", *(str(_HERE / f) for f in _SOURCES),
           "-o", str(output)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)


def _prebuilt() -> pathlib.Path | None:
    found = sorted(_HERE.glob(PREBUILT + "*.so"))
    return found[0] if found else None


def _cached_build() -> pathlib.Path:
    """Dev fallback (an editable checkout): compiles once per source version into the cache."""
    data = b"".join((_HERE / f).read_bytes() for f in _SOURCES + _HEADERS)
    digest = hashlib.sha256(data + jax.__version__.encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("JAXOPT_LAB_CACHE",
                                        pathlib.Path.home() / ".cache" / "jaxopt_lab"))
    lib = cache / f"jol_native-{digest}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        build_native(tmp)
        os.replace(tmp, lib)  # atomic: concurrent builders never see a partial file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def _library() -> str:
    """``"ok"`` once the kernels are registered with XLA, else why they are not."""
    if not set(_WEIGHT_ONLY_FLAGS) <= _cpu_flags():
        return "CPU lacks AVX-512 F/BW/VL"
    tries = [("installed library", lambda: prebuilt)] if (prebuilt := _prebuilt()) else []
    tries.append(("build on first use", _cached_build))
    why = []
    for name, get in tries:
        try:
            lib = ctypes.CDLL(str(get()))
            jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JolInt8Matmul),
                                        platform="cpu")
            for target, symbol in ((_WEIGHT_ONLY_TARGET, lib.JolWeightOnlyMatmul),
                                   (_INT8_CONV_TARGET, lib.JolInt8Conv),
                                   (_WEIGHT_ONLY_CONV_TARGET, lib.JolWeightOnlyConv)):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
            return "ok"
        except Exception as e:  # noqa: BLE001 - e.g. a jaxlib rejecting the library's FFI version
            why.append(f"{name}: {(getattr(e, 'stderr', '') or str(e)).strip()[:400]}")
    if prebuilt is None:
        why.insert(0, "no native library was built when the package was installed (no C++ "
                      "compiler then?)")
    message = "native kernels unavailable, XLA runs instead: " + "; ".join(why)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message


@functools.cache
def native_int8_status() -> str:
    """``"ok"`` if the native int8 kernel is registered, else why not (loaded on first call)."""
    if not set(_INT8_FLAGS) <= _cpu_flags():
        return "CPU lacks AVX512-VNNI"
    return _library()


def native_weight_only_status() -> str:
    """``"ok"`` if the native weight-only kernel is registered, else why not."""
    return _library()


def native_weight_only_available() -> bool:
    """True when the weight-only kernels (`weight_only_matmul_codes`) run natively on CPU."""
    return _enabled and native_weight_only_status() == "ok"


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


    return weight_only_matmul_codes(a, b, scale[None], None, bits=8,
                                    fallback=lambda a, b, rows: xla(a, b, rows[0]))


def weight_only_matmul_codes(a: jax.Array, codes: jax.Array, scale: jax.Array,
                             zero_point: jax.Array | None, *, bits: int,
                             fallback: Callable[..., jax.Array]) -> jax.Array:
    """``a @ W`` with ``W[k, n] = clamp((q[k, n] - z[g, n]) * scale[g, n])``, ``g = k // (K // G)``.

    ``a`` float32 ``(M, K)``; ``codes`` int8 ``(K, N)`` (``bits=8``) or 4-bit codes packed
    along N into uint8 ``(K, ceil(N / 2))``, low nibble first (``bits=4``); ``scale``
    float32 ``(G, N)`` with ``G`` dividing ``K``; ``zero_point`` int8 ``(G, N)`` or ``None``.
    Runs the native kernel (``weight_only.cc``) on CPU when available, else
    ``fallback(a, codes, scale)`` (or with ``zero_point`` too, when given). Shapes and dtypes
    are the caller's to check.
    """
    args = (a, codes, scale) if zero_point is None else (a, codes, scale, zero_point)
    m, n = a.shape[0], scale.shape[1]
    if not native_weight_only_available() or a.size == 0 or codes.size == 0:
        return fallback(*args)

    def native(a, codes, scale, zero_point=None):
        zp = jnp.zeros((0,), jnp.int8) if zero_point is None else zero_point
        out = jax.ShapeDtypeStruct((m, n), jnp.float32)
        return jax.ffi.ffi_call(_WEIGHT_ONLY_TARGET, out, vmap_method="sequential")(
            a, codes, scale, zp, bits=np.int32(bits))

    return lax.platform_dependent(*args, cpu=native, default=fallback)


def _conv_out(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> tuple:
    """``(N * Ho * Wo, Ho, Wo)`` of a VALID convolution of the NHWC ``x``."""
    (kh, kw), (sh, sw) = window, strides
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return x.shape[0] * ho * wo, ho, wo


def int8_conv_codes(x: jax.Array, kernel: jax.Array, fill: jax.Array, *,
                    window: tuple[int, int], strides: tuple[int, int],
                    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
                    fallback: Callable[..., jax.Array]) -> jax.Array:
    """The exact int32 ``(N * Ho * Wo, O)`` convolution of int8 NHWC ``x`` (``kw * C`` a
    multiple of 4) padded with the int8 scalar ``fill`` by ``padding`` (``(lo, hi)`` pairs
    for H and W, each at least 0; the padded input at least the window), with an int8 kernel
    given as its ``(kh * kw * C, O)`` matrix (HWI row order): the VNNI kernel reads each
    pixel's window in place, without an im2col copy or a padded copy (a window touching the
    padding is gathered into a small per-thread scratch). Elsewhere
    ``fallback(x, kernel, fill)``."""
    (pt, pb), (pl, pr) = ((int(lo), int(hi)) for lo, hi in padding)
    padded = (x.shape[0], x.shape[1] + pt + pb, x.shape[2] + pl + pr, x.shape[3])
    m = _conv_out(jax.ShapeDtypeStruct(padded, x.dtype), window, strides)[0]
    if not native_int8_available() or x.size == 0 or kernel.size == 0 or m == 0:
        return fallback(x, kernel, fill)
    (kh, kw), (sh, sw) = window, strides

    def native(x, kernel, fill):
        out = jax.ShapeDtypeStruct((m, kernel.shape[1]), jnp.int32)
        return jax.ffi.ffi_call(_INT8_CONV_TARGET, out, vmap_method="sequential")(
            x, kernel, fill, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh),
            sw=np.int64(sw), pt=np.int64(pt), pb=np.int64(pb), pl=np.int64(pl),
            pr=np.int64(pr))

    return lax.platform_dependent(x, kernel, fill, cpu=native, default=fallback)


def weight_only_conv_codes(x: jax.Array, codes: jax.Array, scale: jax.Array,
                           zero_point: jax.Array | None, *, bits: int,
                           window: tuple[int, int], strides: tuple[int, int],
                           padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
                           fallback: Callable[..., jax.Array]) -> jax.Array:
    """`weight_only_matmul_codes` for a convolution of the float32 NHWC ``x`` with zero
    ``padding`` (``(lo, hi)`` pairs for H and W, each at least 0; the padded input at least
    the window): the kernel's ``(kh * kw * C, N)`` codes times each output pixel's window,
    read in place (no im2col copy, and no padded copy: a window that touches the padding is
    gathered with its zeros into a small per-thread scratch, giving the same bits as the
    padded input would). Returns ``(N * Ho * Wo, N)``; elsewhere
    ``fallback(x, codes, scale[, zero_point])`` on the unpadded ``x``."""
    args = (x, codes, scale) if zero_point is None else (x, codes, scale, zero_point)
    (pt, pb), (pl, pr) = ((int(lo), int(hi)) for lo, hi in padding)
    padded = (x.shape[0], x.shape[1] + pt + pb, x.shape[2] + pl + pr, x.shape[3])
    m = _conv_out(jax.ShapeDtypeStruct(padded, x.dtype), window, strides)[0]
    n = scale.shape[1]
    if not native_weight_only_available() or x.size == 0 or codes.size == 0 or m == 0:
        return fallback(*args)
    (kh, kw), (sh, sw) = window, strides

    def native(x, codes, scale, zero_point=None):
        zp = jnp.zeros((0,), jnp.int8) if zero_point is None else zero_point
        out = jax.ShapeDtypeStruct((m, n), jnp.float32)
        return jax.ffi.ffi_call(_WEIGHT_ONLY_CONV_TARGET, out, vmap_method="sequential")(
            x, codes, scale, zp, bits=np.int32(bits), kh=np.int64(kh), kw=np.int64(kw),
            sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt), pb=np.int64(pb),
            pl=np.int64(pl), pr=np.int64(pr))

    return lax.platform_dependent(*args, cpu=native, default=fallback)
