"""Reruns every CPU benchmark, one after another, each writing its JSON to benchmarks/results/.

Run from the repository root: ``python benchmarks/run_all.py`` (all of them, full sizes:
tens of minutes on a 2-core CPU), ``python benchmarks/run_all.py --smoke`` (every script's
tiny-size smoke run, JSONs to a temporary folder) or ``--only pruning,sweep`` (job names:
``JOBS`` below, one per results file). It prints how long each job took. Each script
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
# Every CPU results file, cheapest first: job name -> (script, its arguments, the JSON it
# writes into results/). gpu_check.sh covers accelerators; ci_legs.json and
# measure_issue14.json are notes written by hand, not benchmark output.
JOBS = {
    "bn_fold": ("bn_fold", (), "bn_fold.json"),
    "train_throughput": ("train_throughput", (), "train_throughput.json"),
    "sweep": ("sweep", (), "sweep.json"),
    "prune_step_variants": ("prune_step_variants", (), "prune_step_variants.json"),
    "pruning": ("pruning", (), "pruning.json"),
    "distillation": ("distillation", (), "distillation.json"),
    "quantization": ("quantization", (), "quantization.json"),
    "quantization_latency": ("quantization", ("--latency-only",), "quantization_latency.json"),
    "model_map": ("model_map", (), "model_map.json"),
    "eager": ("eager", (), "eager.json"),
    "scale": ("scale", (), "scale.json"),
    "scale_0.5gb": ("scale", ("--gb", "0.5"), "scale_0.5gb.json"),
    "scale_2proc": ("scale", ("--processes", "2"), "scale_2proc.json"),
    "one_shot": ("one_shot", (), "one_shot.json"),
    "one_shot_timing": ("one_shot", ("--timing",), "one_shot_timing.json"),
    "refactor_ab": ("refactor_ab", (), "refactor_ab.json"),
    "report_ab": ("report_ab", (), "report_ab.json"),
    # (the fuzz shares at fewer examples than the tests' 200, as measured on a busy machine;
    # `python benchmarks/fuzz_reach.py` alone gives every file at 200: fuzz_reach.json)
    "fuzz_reach_prune_models": (
        "fuzz_reach", ("--files", "test_fuzz_public_api_prune.py,test_fuzz_public_api_models.py",
                       "--examples", "60"),
        "fuzz_reach_public_api_prune_public_api_models.json"),
    # (test_fuzz_public_api.py at its own 200 examples a test, before = the commit before
    # its mixed valid/invalid tests were split; both side by side: 26 minutes at load ~15)
    "fuzz_reach_quant": ("fuzz_reach", ("--files", "test_fuzz_public_api.py",
                                        "--before", "f2c1e03"),
                         "fuzz_reach_public_api.json"),
    # (issue 15: SparseGPT's fuzz tests once at 2000 examples a test)
    "fuzz_sparsegpt_2000": ("fuzz_sparsegpt", (), "fuzz_sparsegpt_2000.json"),
}
SCRIPTS = tuple(dict.fromkeys(script for script, _, _ in JOBS.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="each script's --smoke run once (tiny sizes, JSON to a temporary "
                             "folder)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {', '.join(JOBS)}")
    args = parser.parse_args(argv)
    names = tuple(JOBS) if args.only is None else tuple(args.only.split(","))
    unknown = sorted(set(names) - set(JOBS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(JOBS)}")
    env = dict(os.environ)
    # The scripts import this checkout's jaxopt_lab, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                      env.get("PYTHONPATH")]))
    failed, took, smoked = [], [], set()
    for name in names:
        script, extra, results = JOBS[name]
        path = os.path.join(HERE, f"{script}.py")
        if args.smoke:
            if script in smoked:  # one smoke run per script: its variants share the code
                continue
            smoked.add(script)
            if "--smoke" not in open(path).read():
                print(f"  {name}: SKIPPED, {script}.py has no --smoke flag", file=sys.stderr)
                took.append((name, "skipped", None))
                continue
        cmd = [sys.executable, path, *(["--smoke"] if args.smoke else extra)]
        print(f"+ {' '.join(cmd)}" + ("" if args.smoke else f"  (-> results/{results})"),
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, env=env)
        seconds = time.perf_counter() - t0
        print(f"  {name}: exit {code} after {seconds:.0f} s", file=sys.stderr, flush=True)
        took.append((name, f"exit {code}", seconds))
        if code:
            failed.append(name)
    print("run_all: seconds per job", file=sys.stderr)
    for name, status, seconds in took:
        print(f"  {name:22s} {status:8s} {'' if seconds is None else f'{seconds:8.0f} s'}",
              file=sys.stderr)
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
