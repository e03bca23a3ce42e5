"""The ``jaxopt-lab`` command line: ``run`` (the optimisation report) and ``sweep``.

Examples:
  jaxopt-lab run                      # digits, every variant, ./jaxopt_lab_report/
  jaxopt-lab run --quick --out /tmp/r # the same in under a minute on a laptop CPU
  jaxopt-lab run --data mine.npz --only int8_ptq,pipeline
  jaxopt-lab sweep --param sparsity --values 0,0.5,0.7,0.8,0.9,0.95
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# Only light modules at import time: ``--help`` and argument errors must not wait for JAX.
from jaxopt_lab.app.report.settings import NPZ_LAYOUT, VARIANTS

PROG = "jaxopt-lab"
DEBUG_ENV = "JAXOPT_LAB_DEBUG"  # set to 1 to see the traceback of an unexpected error


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    return values


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxopt-lab`` argument parser (``run`` and ``sweep``), every option with help."""
    parser = _Parser(prog=PROG, description="Make trained JAX models smaller, faster and "
                     "cheaper: quantize, prune, distill and fold batch norm, and compare.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train on digits (or your data), build every variant, "
                         "write a report", description="Trains the teacher, builds every "
                         "variant from jaxopt_lab's public API, measures each on the test split "
                         "and writes report.html (self-contained), report.md, report.json, pareto.png and "
                         "learning_curves.png.")
    run.add_argument("--quick", action="store_true",
                     help="small settings: the whole job in under a minute on a 2-core CPU")
    run.add_argument("--seed", type=_non_negative_int, default=0,
                     help="seed of the split, initialisation and shuffling (default 0)")
    run.add_argument("--out", default="jaxopt_lab_report",
                     help="output folder (default ./jaxopt_lab_report/)")
    run.add_argument("--data", metavar="PATH.npz",
                     help="your own data: " + NPZ_LAYOUT)
    run.add_argument("--only", metavar="NAMES",
                     help="comma-separated variants to build (the baseline always is), from: "
                     + ", ".join(VARIANTS))
    run.add_argument("--devices", type=_positive_int, metavar="N",
                     help="train data-parallel on a mesh of the first N devices "
                     "(jol.train.mesh_train_step); N must not exceed the devices JAX sees")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    sweep = sub.add_parser("sweep", help="train several configurations of the student at "
                           "once under jax.vmap", description="Trains the student on digits "
                           "for every value of one hyperparameter in one compiled, vmapped "
                           "program, prints validation accuracy per configuration and test accuracy for the "
                           "one selected by it.")
    sweep.add_argument("--param", choices=("learning_rate", "sparsity"), default="sparsity",
                       help="the swept hyperparameter (default: final sparsity)")
    sweep.add_argument("--values", type=_float_list,
                       help="comma-separated values (default: 8 values of the parameter)")
    sweep.add_argument("--epochs", type=_positive_int, default=5,
                       help="training epochs of every configuration (default 5)")
    sweep.add_argument("--seed", type=_non_negative_int, default=0,
                       help="seed of the split, initialisation and shuffling (default 0)")
    sweep.add_argument("--out", metavar="PATH.json", help="also write the table as JSON")
    return parser


def _run(args: argparse.Namespace) -> int:
    from jaxopt_lab.app.report import job, render
    from jaxopt_lab.app.report.settings import JobSettings

    settings = JobSettings.preset(quick=args.quick, seed=args.seed, devices=args.devices,
                                  progress=not args.no_progress)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder")
    report = job.run_job(settings, out=args.out, data_path=args.data, only=args.only)
    print(render.table(report["variants"]))
    t = report["timings"]
    print(f"\nwrote report.html, report.md, report.json, the plots and models/ to {args.out} "
          f"in {t['total_s']:.1f} s (teacher training {t['teacher_training_s']:.1f} s)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import json

    from jaxopt_lab.app.sweeps import format_table, sweep_student

    result = sweep_student(param=args.param, values=args.values, epochs=args.epochs,
                           seed=args.seed)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxopt-lab`` and ``python -m jaxopt_lab``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _sweep(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure: still one line, traceback on request
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{PROG}: error: {type(e).__name__}: {_one_line(e)} (set {DEBUG_ENV}=1 for "
              "the traceback)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


if __name__ == "__main__":
    sys.exit(main())
