"""Test-wide settings: 8 host CPU devices, strict rank promotion, hypothesis profiles."""

import os

# Must happen before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Opt-in, for iterating locally: JAXOPT_LAB_TEST_XLA_OPT=0 compiles with LLVM -O0 codegen,
# 2-3x faster on compile-bound tests (tests/test_train_models.py, measured). Not the
# default: at -O0, test_train_step.py's jit and pmap losses of the BatchNorm CNN differ by
# 1e-3 (they agree to 1e-5 at the default level), so CI keeps the codegen users get.
if os.environ.get("JAXOPT_LAB_TEST_XLA_OPT") == "0":
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import io  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# 20 examples per property in CI (was 30): the suite must fit the 25-minute CI budget on
# 2 cores. The fuzz tests keep their own 200 (tests/_fuzz.py) and HYPOTHESIS_PROFILE=fuzz
# runs every property at 200 locally.
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(  # the issues' fuzz counts: HYPOTHESIS_PROFILE=fuzz
    "fuzz",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def quick_report(tmp_path_factory):
    """One in-process ``jaxopt-lab run --quick --seed 0 --no-progress`` for the whole session.

    Returns ``(exit code, output folder, printed stdout)``; tests that need the quick job's
    output share this run instead of paying for their own.
    """
    from jaxopt_lab.app.cli import main

    out = tmp_path_factory.mktemp("quick_report")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["run", "--quick", "--out", str(out), "--seed", "0", "--no-progress"])
    return code, out, printed.getvalue()
