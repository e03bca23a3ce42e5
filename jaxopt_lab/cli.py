"""The ``jaxopt-lab`` command line."""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    import optax

    from jaxopt_lab import train

    data = train.load_digits(seed=args.seed)
    model = train.TeacherCNN(num_classes=data.num_classes)
    variables, _ = train.fit(model, data, optax.adam(2e-3), epochs=args.epochs, seed=args.seed,
                             patience=3, progress=True)
    result = train.evaluate(model, variables, data.test)
    print(f"teacher test accuracy {result['accuracy']:.4f}  macro F1 {result['f1_macro']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxopt-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train on the embedded digits data and report")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
