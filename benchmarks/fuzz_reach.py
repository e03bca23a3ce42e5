"""Share of fuzz examples that reach the property checks, per fuzz test (issue 14).

Runs ``tests/test_fuzz_*.py`` under pytest with ``--hypothesis-show-statistics`` and reads the
events the tests record through ``tests/_fuzz.py``: ``properties checked`` (the result went
through every property check), ``invalid input: error checked`` (an input invalid by
construction raised, as it must) and ``<function>: returned`` / ``<function>: <Error>`` from
``_fuzz.attempt`` (which functions a test fuzzes, and how often each raised). The same is done
for the tests (and package) at ``--before`` (default ef40789, the commit before the prune and
models fuzz files were split into valid and invalid strategies), extracted with
``git archive`` into a temporary folder.

Statistic: generate-phase examples only (hypothesis' explicit, reuse and shrink phases are
left out), ``--hypothesis-seed=0``, ``HYPOTHESIS_PROFILE=fuzz`` (200 examples a test); a share
is the event's count over the examples the test body ran (draws hypothesis rejected before
the body, its "invalid test cases", excluded). A test with no ``properties checked`` event has
``reach: null`` (no hook at that commit), not 0.

Usage, from the repository root: ``python benchmarks/fuzz_reach.py`` (both commits side by
side, all fuzz files: about 15 minutes on a quiet 2-core CPU), ``--files
test_fuzz_public_api_prune.py,...`` (a subset: ``results/fuzz_reach_<names>.json``),
``--smoke`` (one cheap test, no ``--before``; JSON to a temporary folder). Shares do not
depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402

FUZZ_FILES = ("tests/test_fuzz_public_api.py", "tests/test_fuzz_public_api_prune.py",
              "tests/test_fuzz_public_api_models.py", "tests/test_fuzz_model_map.py")
SMOKE_TEST = "tests/test_fuzz_public_api_prune.py::test_schedules"
CHECKED = "properties checked"
ERROR_CHECKED = "invalid input: error checked"

_HEADER = re.compile(r"^(tests/\S+::\S+):\s*$")
_PHASE = re.compile(r"^\s*- during (\w+) phase")
_COUNTS = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")
_EVENT = re.compile(r"^\s*\* ([\d.]+)%, (.+?)\s*$")


def parse_statistics(text: str) -> dict:
    """``{test id: {"run", "invalid", "events": {event: share of examples run}}}`` from the
    output of ``pytest --hypothesis-show-statistics`` (generate phase only)."""
    tests: dict = {}
    current = phase = None
    for line in text.splitlines():
        if m := _HEADER.match(line):
            current, phase = m.group(1), None
            tests[current] = {"run": 0, "invalid": 0, "events": {}}
            continue
        if current is None:
            continue
        if m := _PHASE.match(line):
            phase = m.group(1)
        elif phase != "generate":
            continue
        elif m := _COUNTS.search(line):
            passing, failing, invalid = map(int, m.groups())
            tests[current].update(run=passing + failing, invalid=invalid,
                                  failing=failing)
        elif m := _EVENT.match(line):
            entry = tests[current]
            total = entry["run"] + entry["invalid"]
            # hypothesis' percentages are over every test case, rejected draws included;
            # events only happen in the test body, so rescale to the examples run.
            count = round(float(m.group(1)) / 100 * total)
            entry["events"][m.group(2)] = round(count / entry["run"], 4) if entry["run"] else 0
    for entry in tests.values():
        events = entry["events"]
        entry["reach"] = events.get(CHECKED)
        entry["error_checked"] = events.get(ERROR_CHECKED)
        entry["functions"] = sorted({e.rsplit(": ", 1)[0] for e in events
                                     if ": " in e and e not in (CHECKED, ERROR_CHECKED)
                                     and not e.startswith("invalid input")})
    return tests


# A pytest plugin that sets tests/_fuzz.py's EXAMPLES (the fuzz tests' max_examples, 200)
# before the test modules read it: the same code at both commits, fewer examples per test.
_PLUGIN = """
import os


def pytest_pycollect_makemodule(module_path, parent):
    import _fuzz  # (tests/ is on sys.path once its conftest is loaded)

    _fuzz.EXAMPLES = int(os.environ["FUZZ_REACH_EXAMPLES"])
"""


def start_fuzz(root: str, targets: list[str], log: str, examples: int | None = None
               ) -> subprocess.Popen:
    """Starts the fuzz tests under ``root`` (its own package first on the path), output to
    ``log``; ``examples`` replaces their 200 examples a test."""
    env = dict(os.environ, HYPOTHESIS_PROFILE="fuzz", PYTHONPATH=root)
    plugin = []
    if examples is not None:
        folder = os.path.join(os.path.dirname(log), "plugin")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "fuzz_reach_examples.py"), "w") as f:
            f.write(_PLUGIN)
        env.update(FUZZ_REACH_EXAMPLES=str(examples),
                   PYTHONPATH=os.pathsep.join([root, folder]))
        plugin = ["-p", "fuzz_reach_examples"]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:xdist", "-p",
           "no:cacheprovider", *plugin, "--hypothesis-show-statistics", "--hypothesis-seed=0"]
    print(f"+ (cd {root} && {' '.join(cmd)} > {log})", file=sys.stderr, flush=True)
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def finish_fuzz(proc: subprocess.Popen, log: str) -> tuple[dict, int, str]:
    code = proc.wait()
    text = open(log).read()
    tail = "\n".join(text.splitlines()[-5:])
    print(tail, file=sys.stderr, flush=True)
    return parse_statistics(text), code, tail


def at_revision(rev: str, dest: str) -> str:
    """The tree at ``rev`` (package and tests) extracted into ``dest``."""
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "-C", _util.REPO, "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def table(before: dict | None, after: dict) -> list[dict]:
    rows = []
    for test in sorted(set(after) | set(before or {})):
        a, b = after.get(test), (before or {}).get(test)
        rows.append({
            "test": test.split("::", 1)[1], "file": test.split("::", 1)[0],
            "functions": (a or b)["functions"],
            "reach_before": None if b is None else b["reach"],
            "reach_after": None if a is None else a["reach"],
            "error_checked_after": None if a is None else a["error_checked"],
            "failing_before": None if b is None else b.get("failing", 0),
            "failing_after": None if a is None else a.get("failing", 0),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = _util.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--before", default="ef40789",
                        help="commit to compare with ('' for none; --smoke skips it)")
    parser.add_argument("--files", default=None,
                        help="comma-separated subset of the fuzz files (default: all); the "
                             "JSON is then fuzz_reach_<first file's stem>...")
    parser.add_argument("--examples", type=int, default=None,
                        help="examples per fuzz test instead of its 200 (a faster estimate)")
    args = parser.parse_args(argv)
    targets = ([SMOKE_TEST] if args.smoke else list(FUZZ_FILES) if args.files is None
               else [f if f.startswith("tests/") else f"tests/{f}"
                     for f in args.files.split(",")])
    name = "fuzz_reach" if args.files is None or args.smoke else "fuzz_reach_" + "_".join(
        os.path.basename(t)[len("test_fuzz_"):-3] for t in targets)
    before = before_code = before_tail = None
    # The two commits run side by side (two processes): half the wall time on 2+ cores.
    with tempfile.TemporaryDirectory(prefix="fuzz_reach_") as tmp:
        running = start_fuzz(_util.REPO, targets, os.path.join(tmp, "after.log"),
                             args.examples)
        if args.before and not args.smoke:
            root = at_revision(args.before, os.path.join(tmp, "tree"))
            present = [t for t in targets if os.path.exists(os.path.join(root, t))]
            before_run = start_fuzz(root, present, os.path.join(tmp, "before.log"),
                                    args.examples)
            before, before_code, before_tail = finish_fuzz(before_run,
                                                           os.path.join(tmp, "before.log"))
        after, code, tail = finish_fuzz(running, os.path.join(tmp, "after.log"))
    if not after:
        print("fuzz_reach: no hypothesis statistics in pytest's output", file=sys.stderr)
        return 1
    result = {
        "statistic": ("share of generate-phase examples (rejected draws excluded) whose result "
                      "went through every property check (event 'properties checked'); "
                      "error_checked: share that were invalid by construction and raised"),
        "settings": {"profile": "fuzz", "hypothesis_seed": 0, "targets": targets,
                     "examples_per_test": args.examples or "the tests' own (200)"},
        "before_commit": args.before or None,
        "pytest_exit": {"after": code, "before": before_code},
        "pytest_summary": {"after": tail, "before": before_tail},
        "table": table(before, after),
        "after": after,
        "before": before,
    }
    _util.emit(name, result, out_dir=_util.output_dir(args), smoke=args.smoke)
    if code:
        print(f"fuzz_reach: the fuzz tests failed (pytest exit {code})", file=sys.stderr)
    return 1 if code else 0


if __name__ == "__main__":
    sys.exit(main())
