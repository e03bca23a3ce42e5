"""Builds the native CPU kernels (jaxopt_lab/quant/*.cc) when the package is installed.

Everything else is in pyproject.toml. The kernels are optional: without a C++ compiler,
or off x86-64, the build prints why and installs the package without them; the library
then runs XLA's operations instead (see jaxopt_lab/quant/native.py).
"""

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

QUANT = "jaxopt_lab/quant"
FLAGS = ["-O3", "-g0", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]


class OptionalNativeBuild(build_ext):
    """build_ext whose failure is a message, not a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure leaves the XLA fallback
            self._skip(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._skip(e)

    @staticmethod
    def _skip(error):
        print(f"\njaxopt_lab: the native CPU kernels were NOT built ({error}).\n"
              "jaxopt_lab works without them (XLA runs the int8 and weight-only matmuls, "
              "slower on CPU).\nInstall a C++ compiler (g++) and reinstall to get them.\n",
              file=sys.stderr)


native = Extension(
    "jaxopt_lab.quant._jol_native",
    sources=[f"{QUANT}/int8_gemm.cc", f"{QUANT}/weight_only.cc"],
    include_dirs=[f"{QUANT}/include", QUANT],
    extra_compile_args=FLAGS,
    language="c++",
    optional=True,
)
x86 = platform.machine().lower() in ("x86_64", "amd64")
setup(ext_modules=[native] if x86 and sys.platform.startswith("linux") else [],
      cmdclass={"build_ext": OptionalNativeBuild})
