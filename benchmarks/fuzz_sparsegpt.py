"""SparseGPT's fuzz tests at many more examples than CI's, once (issue 15).

Runs the SparseGPT tests of ``tests/test_fuzz_oneshot.py`` (``-k sparsegpt``: the matrix
function on valid and invalid input, and the tree function) under pytest with
``HYPOTHESIS_PROFILE=fuzz`` raised from its 200 to ``--examples`` examples a test (default
2000) by a small pytest plugin that loads a derived hypothesis profile after the test
suite's conftest has loaded its own; ``--hypothesis-seed=0``. The committed profiles are
unchanged. Records pytest's exit status, its summary, the wall time and, per test, the
generate-phase examples run and failing (read from ``--hypothesis-show-statistics`` as in
``fuzz_reach.py``); a failure's reproducer is in the summary.

Usage, from the repository root: ``python benchmarks/fuzz_sparsegpt.py`` (about 10-20
minutes on a loaded 2-core CPU), ``--examples N``, ``--smoke`` (5 examples of one test,
JSON to a temporary folder). The JSON is ``results/fuzz_sparsegpt_<examples>.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402
from fuzz_reach import parse_statistics  # noqa: E402

TARGET = "tests/test_fuzz_oneshot.py"
SMOKE_TEST = "tests/test_fuzz_oneshot.py::test_sparsegpt_matrix_invalid"

# --timeout=0: pytest-timeout's 600 s a test (pyproject) cut the first run's two slower tests
# at ~200 examples, inside an XLA compile (a "flaky" failure, not the library's).
# Loaded with -p: pytest_configure runs after tests/conftest.py loaded its profile and before
# the test modules are collected, so every @given test takes the derived profile.
_PLUGIN = """
import os

from hypothesis import settings


def pytest_configure(config):
    n = int(os.environ["FUZZ_SPARSEGPT_EXAMPLES"])
    settings.register_profile("fuzz_many", settings.get_profile("fuzz"), max_examples=n)
    settings.load_profile("fuzz_many")
"""


def main(argv: list[str] | None = None) -> int:
    parser = _util.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--examples", type=int, default=2000,
                        help="examples per test (default 2000; the committed profile: 200)")
    args = parser.parse_args(argv)
    examples = 5 if args.smoke else args.examples
    targets = [SMOKE_TEST] if args.smoke else [TARGET, "-k", "sparsegpt"]
    with tempfile.TemporaryDirectory(prefix="fuzz_sparsegpt_") as tmp:
        with open(os.path.join(tmp, "fuzz_sparsegpt_plugin.py"), "w") as f:
            f.write(_PLUGIN)
        env = dict(os.environ, HYPOTHESIS_PROFILE="fuzz", FUZZ_SPARSEGPT_EXAMPLES=str(examples),
                   PYTHONPATH=os.pathsep.join([_util.REPO, tmp]))
        cmd = [sys.executable, "-m", "pytest", *targets, "-p", "no:xdist", "-p",
               "no:cacheprovider", "-p", "fuzz_sparsegpt_plugin", "--timeout=0",
               "--hypothesis-show-statistics", "--hypothesis-seed=0"]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=_util.REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    stats = parse_statistics(text)
    # pytest's last line that counts passed/failed tests (the durations table comes after).
    tail = next((line.strip("= ") for line in reversed(text.splitlines())
                 if re.search(r"\d+ (passed|failed|error)", line)), text[-500:])
    print(tail, file=sys.stderr)
    failures = [line for line in text.splitlines()
                if line.startswith(("FAILED", "Falsifying example", "E  "))]
    result = {
        "what": "the SparseGPT fuzz tests of tests/test_fuzz_oneshot.py (-k sparsegpt) at "
                f"{examples} examples a test (the committed 'fuzz' profile: 200; ci: 30)",
        "settings": {"profile": f"fuzz with max_examples={examples}", "hypothesis_seed": 0,
                     "targets": targets},
        "pytest_exit": proc.returncode,
        "pytest_summary": tail,
        "failures": failures[:50] or "none",
        "wall_seconds": round(seconds, 1),
        "per_test": {t.split("::", 1)[1]: {"examples_run": s["run"],
                                             "failing": s.get("failing", 0),
                                             "rejected_draws": s["invalid"],
                                             "reach": s["reach"]}
                     for t, s in stats.items()},
    }
    _util.emit(f"fuzz_sparsegpt_{examples}", result, out_dir=_util.output_dir(args),
               smoke=args.smoke)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
