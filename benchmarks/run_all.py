"""Reruns every CPU benchmark, one after another, each writing its JSON to benchmarks/results/.

Run from the repository root: ``python benchmarks/run_all.py`` (all of them, full sizes:
tens of minutes on a 2-core CPU), ``python benchmarks/run_all.py --smoke`` (every script's
tiny-size smoke run, JSONs to a temporary folder) or ``--only pruning,sweep``. Each script
runs in its own process with this interpreter, so one benchmark's memory and compile caches
do not colour the next one's figures; a script that fails makes the whole command fail (the
others still run), never a silent gap. Each JSON records its commit, date, machine and the
exact command (``benchmarks/_util.py``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The CPU benchmarks, cheapest first. gpu_check.sh covers accelerators.
SCRIPTS = ("bn_fold", "train_throughput", "sweep", "prune_step_variants", "pruning",
           "distillation", "quantization", "model_map", "eager", "scale", "one_shot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="each script's --smoke run (tiny sizes, JSON to a temporary folder)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    args = parser.parse_args(argv)
    names = SCRIPTS if args.only is None else tuple(args.only.split(","))
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(SCRIPTS)}")
    env = dict(os.environ)
    # The scripts import this checkout's jaxopt_lab, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                      env.get("PYTHONPATH")]))
    failed = []
    for name in names:
        path = os.path.join(HERE, f"{name}.py")
        if args.smoke and "--smoke" not in open(path).read():
            print(f"  {name}: SKIPPED, the script has no --smoke flag yet", file=sys.stderr)
            continue
        cmd = [sys.executable, os.path.join(HERE, f"{name}.py")] + (["--smoke"] if args.smoke
                                                                      else [])
        print(f"+ {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, env=env)
        print(f"  {name}: exit {code} after {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
