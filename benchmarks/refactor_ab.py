"""Quantized inference before and after the model-aware refactor, side by side.

Issue 13 moved quantized execution from per-layer method interception to one jaxpr hook
layer (``jaxopt_lab.core.flax_hooks``). This script checks that it cost no speed: it
extracts the package as it was at ``--before`` (default ``cfc1d55``, the last commit
before the refactor) into a temporary folder and runs the same measurement against it
and against this checkout, in alternating child processes (before, after, after,
before, ...), so a slow phase of the machine hits both alike.

Each child builds the same stock-Flax models (an MLP and a 3-channel conv net; nothing
from the package's own model zoo, whose location moved), quantizes them with the public
API both versions share (``jol.quantize``, ``jol.quantized_apply``) and times the
jitted calls, interleaved, taking medians. The parent pairs each round's before/after
medians and reports ``after / before`` as the median of per-round ratios
(:func:`_util.paired_ratio`): below 1 is faster after the refactor.

Run: ``python benchmarks/refactor_ab.py`` (about 5 minutes on 2 cores); ``--smoke``
for a quick check that writes to a temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _child(root: str, repeats: int, smoke: bool) -> dict:
    """Times every case with the package found under ``root``; returns medians (s)."""
    sys.path.insert(0, root)
    sys.path.insert(1, HERE)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import _util
    import jaxopt_lab as jol

    check_imported_from(jol, root)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(1024)(x))
            x = nn.relu(nn.Dense(1024)(x))
            return nn.Dense(10)(x)

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.relu(nn.Conv(64, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    rng = np.random.default_rng(0)
    cases = {}
    models = {"mlp": (MLP(), (784,)), "conv": (ConvNet(), (32, 32, 3))}
    for name, (model, shape) in models.items():
        if smoke and name != "mlp":
            continue
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
        q8 = jol.quantize(variables, bits=8)
        for batch in (1,) if smoke else (1, 16):
            x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
            fp32 = jax.jit(model.apply)
            wo = jax.jit(lambda q, x, m=model: jol.quantized_apply(m, q, x))
            w8a8 = jax.jit(lambda q, x, m=model: jol.quantized_apply(m, q, x, mode="w8a8"))
            cases[f"{name}_b{batch}"] = {
                "fp32": lambda f=fp32, v=variables, x=x: f(v, x),
                "int8_weight_only": lambda f=wo, q=q8, x=x: f(q, x),
                "w8a8_dynamic": lambda f=w8a8, q=q8, x=x: f(q, x),
            }
    out = {}
    for case, fns in cases.items():
        times = _util.interleaved_seconds(fns, repeats=repeats, warmup=3)
        out.update({f"{case}/{k}": statistics.median(v) for k, v in times.items()})
    params = models["mlp"][0].init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
    # Eager: what a notebook calls once per model. Jitted: what a loop over many
    # quantizations should call (one compiled program, no host round trip).
    eager = (lambda: jol.quantize(params, bits=8))  # noqa: E731
    jitted = jax.jit(lambda p: jol.quantize(p, bits=8))
    out["mlp/quantize_int8_eager"] = _util.median_seconds(eager, repeats=repeats, warmup=2)
    out["mlp/quantize_int8_jit"] = _util.median_seconds(lambda: jitted(params),
                                                        repeats=repeats, warmup=2)
    return out


def check_imported_from(package, root: str) -> None:
    """Exits the child unless ``package`` (a module) was imported from under ``root``."""
    found = os.path.realpath(os.path.dirname(package.__file__))
    if not found.startswith(os.path.realpath(root)):
        raise SystemExit(f"imported {package.__name__} from {found}, not from {root}")


def extract(rev: str, dest: str) -> str:
    """The package as it was at ``rev``, under ``dest`` (``git archive``; no checkout)."""
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "jaxopt_lab"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def resolve_commit(rev: str, *, smoke: bool) -> str | None:
    """The full hash of ``rev``; None where this clone lacks it (a shallow clone), which
    only a smoke run accepts (it then compares the package with itself)."""
    found = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", "--quiet",
                            f"{rev}^{{commit}}"], capture_output=True, text=True)
    sha = found.stdout.strip() or None
    if sha is None and not smoke:
        raise SystemExit(f"commit {rev!r} is not in this clone (a shallow clone?)")
    return sha


def package_roots(before_sha: str | None, dest: str) -> dict[str, str]:
    """The folders holding each version's ``jaxopt_lab``: ``before`` extracted into ``dest``,
    ``after`` the one this interpreter imports."""
    # "after" is the package this interpreter imports (an installed copy carries the
    # native kernels its build compiled; the checkout's sources may not).
    installed = importlib.util.find_spec("jaxopt_lab").submodule_search_locations[0]
    after = os.path.dirname(installed)
    # A smoke run in a shallow clone checks the script against the package itself.
    return {"before": extract(before_sha, dest) if before_sha else after, "after": after}


def run_alternating(script: str, roots: dict[str, str], rounds: int,
                    child_args: Callable[[str, int], list[str]]) -> dict[str, list[dict]]:
    """Runs ``script --child ROOT *child_args(version, round)`` once per version and round,
    alternating which version goes first (before, after, after, before, ...); returns each
    version's parsed JSON (a child's last stdout line), in round order."""
    results: dict[str, list[dict]] = {version: [] for version in roots}
    env = {**os.environ, "PYTHONPATH": ""}  # the child's path names one package only
    t0 = time.time()
    for r in range(rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for version in order:
            cmd = [sys.executable, os.path.abspath(script), "--child", roots[version],
                   *child_args(version, r)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"{version} child failed (exit {out.returncode}):\n"
                                 f"{out.stderr[-4000:]}")
            results[version].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {version} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    return results


def main(argv=None) -> None:
    sys.path.insert(0, HERE)
    import _util

    parser = _util.add_common_args(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--before", default="cfc1d55", help="the commit before the refactor")
    parser.add_argument("--rounds", type=int, default=6, help="child processes per version")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per case")
    parser.add_argument("--child", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.repeats, args.smoke)))
        return
    rounds, repeats = (1, 3) if args.smoke else (args.rounds, args.repeats)
    before_sha = resolve_commit(args.before, smoke=args.smoke)
    with tempfile.TemporaryDirectory(prefix="jol_ab_") as tmp:
        results = run_alternating(__file__, package_roots(before_sha, tmp), rounds,
                                  lambda version, r: ["--repeats", str(repeats)]
                                  + (["--smoke"] if args.smoke else []))
    ratios = {case: _util.paired_ratio([a[case] for a in results["after"]],
                                       [b[case] for b in results["before"]])
              for case in results["after"][0]}

    def per_fp32(rounds: list[dict], case: str) -> list[float]:
        """``case`` over fp32 at the same batch, within each child: what is left of the
        variant's cost once the process-to-process noise both share is divided out."""
        base = case.split("/")[0] + "/fp32"
        return [r[case] / r[base] for r in rounds]

    relative = {case: _util.paired_ratio(per_fp32(results["after"], case),
                                         per_fp32(results["before"], case))
                for case in results["after"][0]
                if case.startswith(("mlp_b", "conv_b")) and not case.endswith("/fp32")}
    _util.emit("refactor_ab", {
        "what": "jitted quantized_apply latency (and quantize time) after / before the "
                "model-aware refactor; per-round medians of interleaved calls, paired across "
                "alternating child processes; below 1 = faster after",
        "before": before_sha or "not in this clone: the package compared with itself",
        "rounds": rounds,
        "repeats_per_round": repeats,
        "median_seconds": {v: {c: statistics.median(r[c] for r in rs) for c in rs[0]}
                           for v, rs in results.items()},
        "after_over_before": {c: round(r["value"], 3) for c, r in ratios.items()},
        "after_over_before_detail": ratios,
        "after_over_before_relative_to_fp32": {c: round(r["value"], 3)
                                               for c, r in relative.items()},
        "after_over_before_relative_to_fp32_detail": relative,
    }, out_dir=_util.output_dir(args), smoke=args.smoke)


if __name__ == "__main__":
    main()
