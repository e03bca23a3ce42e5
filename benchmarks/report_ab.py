"""The ``jaxopt-lab run --quick`` report before and after the model-aware refactor, side by side.

Issue 13 asks that the report's numbers be unchanged or better after the refactor. This
script runs the report's own Python entry point (``run_job`` with the ``--quick`` preset,
the same seed) with the package as it was at ``--before`` (default ``cfc1d55``, the last
commit before the refactor; extracted with ``git archive``) and with this checkout, each
in its own child process with its own output folder, alternating which goes first
(helpers shared with ``refactor_ab.py``). It then compares every number the report
produces, variant by variant:

- accuracy, F1, parameter counts, sparsity and file size must be IDENTICAL on a
  deterministic CPU; each difference is listed, and every saved model's tensors are
  compared one by one (file size split into the safetensors header and the tensor bytes),
  so a size change from the file's metadata is told apart from a change of the weights.
  Rounds of the same version are compared too: a difference between versions counts only
  where each version reproduces itself.
- inference memory (weights plus XLA's temporaries, per batch size) is taken in every
  child from the report's own compiled inference calls, the same way for both versions
  (the report at ``--before`` did not measure it), compiled as XLA's CPU backend does by
  default (``*_default_compile``: YNNPACK-fused layers' buffers are invisible there) and
  without YNNPACK fusion, where every activation is counted.
- latency: the report's own figures are short and were measured differently before the
  refactor (batch 1 then timed 10 calls in flight), so each child re-times the report's
  compiled inference calls of every variant with ``_util.interleaved_seconds`` (the same
  code for both versions) and the parent reports ``after / before`` as the median of
  per-round ratios, raw and relative to the baseline variant in the same child (which
  divides out the process-to-process noise both share). Below 1 = faster after.

Run: ``python benchmarks/report_ab.py`` (3 rounds: six quick reports; 26 minutes on a
2-core CPU at load 15-20, 7.5 minutes of CPU time); ``--smoke`` runs one tiny report
(teacher and int8 variant only) per version and writes to a temporary folder (2 minutes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import refactor_ab  # noqa: E402 - benchmarks/ is not a package

# Report keys that hold latency (timed, noisy) or raw samples: compared as ratios, not
# for equality.
_TIMED = ("latency_",)
# The XLA option that keeps every CPU activation an XLA buffer (no YNNPACK fusion).
ALL_BUFFERS_VISIBLE = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _job_modules(root: str):
    """The report's ``job`` and ``settings`` modules, where the version under ``root`` keeps
    them, each checked to come from ``root``."""
    # Chosen on disk, not by trying imports: the editable install's finder would resolve
    # a subpackage the old tree lacks (``jaxopt_lab.app``) from the installed checkout.
    after = os.path.isdir(os.path.join(root, "jaxopt_lab", "app", "report"))
    package = "jaxopt_lab.app.report" if after else "jaxopt_lab.report"
    modules = tuple(importlib.import_module(f"{package}.{name}") for name in ("job", "settings"))
    for module in modules:
        refactor_ab.check_imported_from(module, root)
    return modules


def _child(root: str, out: str, *, seed: int, repeats: int, smoke: bool) -> dict:
    """Runs the quick report with the package under ``root`` into ``out``; returns its rows,
    the re-timed latency, the inference memory and the job's timings."""
    sys.path.insert(0, root)
    import jax
    import numpy as np

    import _util
    import jaxopt_lab as jol

    refactor_ab.check_imported_from(jol, root)
    job, settings_module = _job_modules(root)
    overrides = dict(teacher_epochs=1, latency_repeats=1) if smoke else {}
    settings = settings_module.JobSettings.preset(quick=True, seed=seed, progress=False,
                                                  **overrides)
    # The report times its variants right after building them and then drops the
    # compiled calls; keep them (the same objects the report timed) to re-time them here.
    calls: dict[str, dict[int, object]] = {}
    build_and_measure = job.build_and_measure

    def keep_calls(ctx, names, model_dir):
        measured, seconds = build_and_measure(ctx, names, model_dir)
        calls.update({name: variant_calls for name, (_, variant_calls) in measured.items()})
        return measured, seconds

    job.build_and_measure = keep_calls
    report = job.run_job(settings, out=out, only="int8_ptq" if smoke else None)

    rows = {row["name"]: {k: v for k, v in row.items() if not k.endswith("samples_ms")}
            for row in report["variants"]}
    retimed, relative = {}, {}
    batches = sorted(calls["baseline"])
    for batch in batches:
        times = _util.interleaved_seconds({n: c[batch] for n, c in calls.items()},
                                          repeats=repeats, warmup=2)
        for name, seconds in times.items():
            retimed[f"{name}/b{batch}"] = 1e3 * statistics.median(seconds)
            # Within this child, round by round: the variant over the baseline.
            relative[f"{name}/b{batch}"] = statistics.median(
                s / b for s, b in zip(seconds, times["baseline"], strict=True))
    memory = {}
    for name, variant_calls in calls.items():
        first = variant_calls[batches[0]]
        weights = int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(first.args[0])))
        memory[name] = {"weights_bytes": weights}
        for batch, call in variant_calls.items():
            lowered = call.func.lower(*call.args)
            # With YNNPACK fusion (XLA's CPU default) the fused layers' buffers are invisible
            # to memory_analysis; without it every activation is an XLA buffer. Both are
            # recorded; the second is the like-for-like figure.
            for suffix, options in (("_default_compile", {}), ("", ALL_BUFFERS_VISIBLE)):
                analysis = lowered.compile(compiler_options=options).memory_analysis()
                temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis else 0
                memory[name][f"temp_b{batch}_bytes{suffix}"] = temp
                memory[name][f"b{batch}_bytes{suffix}"] = weights + temp
    timings = {k: v for k, v in report["timings"].items() if isinstance(v, (int, float))}
    return {"rows": rows, "retimed_ms": retimed, "retimed_over_baseline": relative,
            "memory": memory, "timings": timings, "out": out}


def _file_parts(path: str) -> dict:
    """A saved model's size, split into the safetensors header and the tensor bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0]
        header = json.loads(f.read(header_len))
    size = os.path.getsize(path)
    meta = header.get("__metadata__", {})
    try:
        version = json.loads(meta.get("jaxopt_lab", "{}")).get("version")
    except json.JSONDecodeError:
        version = None
    return {"bytes": size, "header_bytes": 8 + header_len,
            "tensor_bytes": size - 8 - header_len, "format_version": version}


def _tensor_diff(before: str, after: str) -> dict:
    """Which tensors of two saved models differ, and by how much."""
    import numpy as np
    from safetensors.numpy import load_file

    a, b = load_file(before), load_file(after)
    out = {"tensors": len(b), "only_before": sorted(set(a) - set(b)),
           "only_after": sorted(set(b) - set(a)), "differ": {}}
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            out["differ"][key] = {"before": f"{x.dtype}{list(x.shape)}",
                                  "after": f"{y.dtype}{list(y.shape)}"}
        elif x.tobytes() != y.tobytes():
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            out["differ"][key] = {"elements_differ": int(np.count_nonzero(x != y)),
                                  "elements": int(x.size), "max_abs_diff": float(d.max())}
    out["identical"] = not (out["differ"] or out["only_before"] or out["only_after"])
    return out


def _row_diff(a: dict, b: dict) -> dict:
    """``{key: {before, after}}`` for every shared, untimed report figure that differs."""
    return {k: {"before": a[k], "after": b[k]} for k in sorted(set(a) & set(b))
            if not k.startswith(_TIMED) and a[k] != b[k]}


def _reproduces(rounds: list[dict]) -> dict:
    """Per variant, the untimed figures that differ between rounds of one version."""
    out = {}
    for other in rounds[1:]:
        for name, row in rounds[0]["rows"].items():
            diff = _row_diff(row, other["rows"][name])
            if diff:
                out.setdefault(name, {}).update(diff)
    return out


def main(argv=None) -> None:
    import _util

    parser = _util.add_common_args(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--before", default="cfc1d55", help="the commit before the refactor")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per version")
    parser.add_argument("--repeats", type=int, default=30,
                        help="timed calls per variant and batch size in each child")
    parser.add_argument("--seed", type=int, default=0, help="the report's seed")
    parser.add_argument("--child", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.child_out, seed=args.seed,
                                repeats=args.repeats, smoke=args.smoke)))
        return
    rounds, repeats = (1, 2) if args.smoke else (args.rounds, args.repeats)
    before_sha = refactor_ab.resolve_commit(args.before, smoke=args.smoke)
    with tempfile.TemporaryDirectory(prefix="jol_report_ab_") as tmp:
        package = os.path.join(tmp, "package")
        os.makedirs(package)

        def child_args(version: str, r: int) -> list[str]:
            return (["--child-out", os.path.join(tmp, f"{version}_{r}"), "--seed",
                     str(args.seed), "--repeats", str(repeats)]
                    + (["--smoke"] if args.smoke else []))

        results = refactor_ab.run_alternating(
            __file__, refactor_ab.package_roots(before_sha, package), rounds, child_args)
        first = {v: rs[0] for v, rs in results.items()}
        names = list(first["after"]["rows"])
        files = {v: {n: os.path.join(first[v]["out"], "models", first[v]["rows"][n]["file"])
                     for n in names} for v in first}
        sizes = {n: {v: _file_parts(files[v][n]) for v in first} for n in names}
        tensors = {n: _tensor_diff(files["before"][n], files["after"][n]) for n in names}
        # A version reproduces its saved weights from round to round, too.
        weights_reproduce = {
            v: sorted(n for n in names for other in rs[1:] if not _tensor_diff(
                files[v][n], os.path.join(other["out"], "models", rs[0]["rows"][n]["file"])
            )["identical"])
            for v, rs in results.items()}

    before_rows, after_rows = first["before"]["rows"], first["after"]["rows"]
    figures = {n: _row_diff(before_rows[n], after_rows[n]) for n in names}
    # Per variant: a key the variant has in one version only (e.g. the pipeline's own
    # figures) is listed once; the compared keys are those both versions have.
    keys = {"compared": sorted({k for n in names for k in set(before_rows[n]) & set(after_rows[n])
                                if not k.startswith(_TIMED)}),
            "only_after": sorted({k for n in names for k in set(after_rows[n]) - set(before_rows[n])}),
            "only_before": sorted({k for n in names
                                   for k in set(before_rows[n]) - set(after_rows[n])})}

    def paired(field: str, key: str) -> dict:
        return _util.paired_ratio([r[field][key] for r in results["after"]],
                                  [r[field][key] for r in results["before"]])

    cases = list(first["after"]["retimed_ms"])
    latency = {c: paired("retimed_ms", c) for c in cases}
    relative = {c: paired("retimed_over_baseline", c) for c in cases
                if not c.startswith("baseline/")}
    job_time = {k: paired("timings", k) for k in ("total_s", "teacher_training_s",
                                                  "build_and_evaluate_s")}
    memory = {n: {"before": first["before"]["memory"][n], "after": first["after"]["memory"][n]}
              for n in names}
    own_latency = {v: {n: {k: statistics.median(r["rows"][n][k] for r in rs)
                           for k in rs[0]["rows"][n] if k.startswith("latency_")}
                       for n in names} for v, rs in results.items()}
    _util.emit("report_ab", {
        "what": "the `jaxopt-lab run --quick` report (run_job, quick preset, seed "
                f"{args.seed}) before / after the model-aware refactor: every untimed figure "
                "compared for equality, saved tensors compared one by one, inference memory "
                "and re-timed latency (after / before, median of per-round ratios over "
                "alternating child processes; below 1 = faster after)",
        "before": before_sha or "not in this clone: the package compared with itself",
        "seed": args.seed,
        "rounds": rounds,
        "repeats_per_round": repeats,
        "figures_identical": sorted(n for n in names if not figures[n]),
        "figures_differ": {n: d for n, d in figures.items() if d},
        "figure_keys": keys,
        "reproducible_within_version": {
            v: {"figures_differ_between_rounds": _reproduces(rs),
                "weights_differ_between_rounds": weights_reproduce[v]}
            for v, rs in results.items()},
        "size_bytes": {n: {**s, "header_delta": s["after"]["header_bytes"]
                           - s["before"]["header_bytes"],
                           "tensor_delta": s["after"]["tensor_bytes"]
                           - s["before"]["tensor_bytes"]} for n, s in sizes.items()},
        "tensors_identical": sorted(n for n in names if tensors[n]["identical"]),
        "tensors_differ": {n: t for n, t in tensors.items() if not t["identical"]},
        "memory_bytes": memory,
        "memory_identical": sorted(n for n in names if memory[n]["before"]
                                   == memory[n]["after"]),
        "latency_after_over_before": {c: round(r["value"], 3) for c, r in latency.items()},
        "latency_after_over_before_relative_to_baseline": {
            c: round(r["value"], 3) for c, r in relative.items()},
        "latency_after_over_before_detail": latency,
        "latency_after_over_before_relative_to_baseline_detail": relative,
        "retimed_median_ms": {v: {c: statistics.median(r["retimed_ms"][c] for r in rs)
                                  for c in cases} for v, rs in results.items()},
        "job_seconds_after_over_before": {k: round(r["value"], 3)
                                          for k, r in job_time.items()},
        "job_seconds_after_over_before_detail": job_time,
        "job_seconds": {v: [r["timings"] for r in rs] for v, rs in results.items()},
        "report_own_latency_medians": own_latency,
        "report_own_latency_note": "the report's own figures, median over rounds; not "
                                   "comparable across versions (before: batch 1 timed as "
                                   "10 calls in flight, after: one blocked call at a time)",
    }, out_dir=_util.output_dir(args), smoke=args.smoke)


if __name__ == "__main__":
    main()
