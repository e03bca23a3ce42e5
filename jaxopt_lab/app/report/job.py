"""The main job: train the teacher, build every variant, measure them, write the report."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

import jaxopt_lab as jol
from jaxopt_lab import train
from jaxopt_lab.app import datasets
from jaxopt_lab.app.report import measure, pipeline, render, variants
from jaxopt_lab.app.report.context import JobContext
from jaxopt_lab.app.report.models import as_model_input, models_for
from jaxopt_lab.app.report.settings import NPZ_LAYOUT, VARIANTS, JobSettings
from jaxopt_lab.app.report.training import check_devices

BUILDERS: dict[str, Callable[[JobContext], variants.Variant]] = {
    "baseline": variants.baseline,
    "bn_folded": variants.bn_folded,
    "int8_ptq": variants.int8_ptq,
    "int4_group_ptq": variants.int4_group_ptq,
    "int4_qat": variants.int4_qat,
    "prune50_gradual": variants.prune50_gradual,
    "prune90_gradual": variants.prune90_gradual,
    "nm24": variants.nm24,
    "channel_compact": variants.channel_compact,
    "student_kd": variants.student_kd,
    "pipeline": pipeline.pipeline,
}
assert tuple(BUILDERS) == VARIANTS


def select_variants(only: str | Sequence[str] | None) -> tuple[str, ...]:
    """The variants to build, in report order; the baseline is always included.

    Raises:
      ValueError: an unknown or empty name.
      TypeError: a name that is not a string.
    """
    if only is None:
        return VARIANTS
    names = only.split(",") if isinstance(only, str) else list(only)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"variant names must be strings, got {only!r}")
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"--only needs comma-separated variant names, got {only!r}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(VARIANTS)}")
    wanted = {"baseline", *names}
    return tuple(n for n in VARIANTS if n in wanted)


def load_data(path: str | None, seed: int) -> tuple[train.Dataset, str]:
    """The embedded digits, or a user ``.npz`` with ``x`` and ``y``, ready for the models.

    Raises:
      ValueError: an unreadable file, bad arrays, a single class, or too few examples for
        three splits; the message names the expected layout.
    """
    if path is None:
        data, name = datasets.load_digits(seed=seed), "digits (scikit-learn, embedded)"
    else:
        name = os.path.basename(path)
        try:
            data = datasets.load_npz(path, seed=seed)
        except Exception as e:  # a CSV, a pickle, a corrupt zip, wrong keys or dtypes...
            raise ValueError(f"--data {path!r}: {_npz_problem(path, e)}; expected "
                             f"{NPZ_LAYOUT}") from None
        classes = np.unique(np.concatenate([data.train.y, data.val.y, data.test.y]))
        if len(classes) < 2:
            raise ValueError(f"--data {path!r} has a single class ({classes.tolist()}): there "
                             f"is nothing to classify; expected {NPZ_LAYOUT}")
    splits = [train.Split(as_model_input(s.x), s.y) for s in (data.train, data.val, data.test)]
    for label, split in zip(("train", "validation", "test"), splits):
        if len(split.y) == 0:
            raise ValueError(f"{name}: too few examples for a {label} split "
                             f"({sum(len(s.y) for s in splits)} in all)")
    return train.Dataset(*splits, data.num_classes), name


def _npz_problem(path: str, error: Exception) -> str:
    """What is wrong with a data file, in words (not numpy's advice to unpickle it)."""
    if not os.path.isfile(path):
        return "does not exist"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        return "is not an .npz archive"
    text = " ".join(str(error).split())
    if "pickle" in text.lower():  # numpy's advice to unpickle would run untrusted code
        return "holds Python objects (object arrays), not numeric arrays"
    return text


def environment() -> dict[str, Any]:
    return {
        "jaxopt_lab": jol.__version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def _progress(items, settings: JobSettings, desc: str, total: int | None = None):
    if not settings.progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


# Slowest first, so that parallel builders finish together.
_BUILD_ORDER = ("pipeline", "channel_compact", "int4_qat", "prune90_gradual",
                "prune50_gradual", "nm24", "student_kd", "int4_group_ptq", "int8_ptq",
                "bn_folded", "baseline")
assert sorted(_BUILD_ORDER) == sorted(VARIANTS)


class _BuildProgress:
    """Progress of "build variants": which variants are being built now, and a line per
    finished variant with its time, so the bar never sits silent at 0% for long."""

    def __init__(self, settings: JobSettings, total: int):
        self._bar = None
        self._running: list[str] = []
        self._lock = threading.Lock()
        if settings.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="build variants", leave=False)

    def started(self, name: str) -> None:
        with self._lock:
            self._running.append(name)
            self._show()

    def finished(self, name: str, seconds: float) -> None:
        with self._lock:
            self._running.remove(name)
            if self._bar is not None:
                self._bar.write(f"built {name} in {seconds:.1f} s")
                self._bar.update(1)
            self._show()

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str("building " + ", ".join(self._running)
                                      if self._running else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def build_and_measure(ctx: JobContext, names: Sequence[str], model_dir: str
                      ) -> tuple[dict[str, tuple[dict, dict]], dict[str, float]]:
    """Builds, saves, reloads and evaluates the named variants, several at once in threads.

    Returns each variant's row without latency and its compiled latency calls, and the
    seconds each took. Every builder is deterministic on its own, so nothing depends on
    how the threads interleave. Latency is timed afterwards, one variant at a time.
    """
    ordered = [n for n in _BUILD_ORDER if n in names]
    progress = _BuildProgress(ctx.settings, len(ordered))

    def work(name):
        progress.started(name)
        ctx.building(name)
        t0 = time.perf_counter()
        try:
            variant = BUILDERS[name](ctx)
            out = measure.measure(variant, ctx.data, model_dir, seed=ctx.settings.seed)
        finally:
            ctx.building(None)
        seconds = time.perf_counter() - t0
        progress.finished(name, seconds)
        return out, seconds

    workers = ctx.settings.build_workers()
    try:
        if workers == 1:
            done = {n: work(n) for n in ordered}
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, "jaxopt-lab-build") as pool:
                futures = {pool.submit(work, n): n for n in ordered}
                done = {}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        done[futures[future]] = future.result()
                except BaseException:  # a failed builder or Ctrl-C: start nothing more
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        progress.close()
    return {n: done[n][0] for n in names}, {n: done[n][1] for n in names}


def run_job(settings: JobSettings, *, out: str, data_path: str | None = None,
            only: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the whole job and writes ``report.json``, ``.md``, ``.html`` and the plots.

    Trains the teacher, builds the selected variants (several at once, see
    ``JobSettings.workers``), saves each with ``jol.save`` under ``out/models/``, reloads
    and evaluates it on the test split, then times every variant's inference alternately
    with the baseline's.

    Args:
      settings: what to do (``JobSettings.preset(quick=...)``).
      out: output folder (created).
      data_path: an ``.npz`` with ``x`` and ``y``; None for the embedded digits.
      only: variant names (comma-separated or a sequence); the baseline is always built.

    Returns:
      The report dict (what ``report.json`` holds); ``report["variants"]`` has one row per
      variant. Everything but ``latency_*`` and ``timings`` depends only on the seed.

    Raises:
      ValueError: bad settings, data or selection (nothing is trained then).

    Examples:
      >>> import tempfile
      >>> from jaxopt_lab.app.report import JobSettings, run_job
      >>> settings = JobSettings.preset(quick=True, teacher_epochs=1, progress=False)
      >>> report = run_job(settings, out=tempfile.mkdtemp(), only="int8_ptq")
      >>> [row["name"] for row in report["variants"]]
      ['baseline', 'int8_ptq']
    """
    start = time.perf_counter()
    names = select_variants(only)
    check_devices(settings.devices)
    data, data_name = load_data(data_path, settings.seed)
    pair = models_for(data.train.x, data.num_classes)
    model_dir = os.path.join(out, "models")
    os.makedirs(model_dir, exist_ok=True)

    t0 = time.perf_counter()
    ctx = JobContext(data, pair, None, settings,
                     progress=settings.progress and settings.build_workers() == 1)
    ctx.building("baseline")
    ctx.teacher_variables = ctx.fit(pair.teacher, optax.adam(settings.learning_rate),
                                    epochs=settings.teacher_epochs, patience=settings.patience,
                                    progress=settings.progress)
    ctx.building(None)
    t1 = time.perf_counter()
    measured, build_s = build_and_measure(ctx, names, model_dir)
    t2 = time.perf_counter()
    rows, latency_s, baseline_calls = [], {}, measured["baseline"][1]
    for name in _progress(names, settings, "time latency"):
        t = time.perf_counter()
        row, calls = measured[name]
        row.update(measure.latency(calls, repeats=settings.latency_repeats,
                                   baseline=None if name == "baseline" else baseline_calls))
        rows.append(row)
        latency_s[name] = time.perf_counter() - t
    measure.add_latency_ratios(rows, rows[0])
    measure.add_ratios(rows, rows[0])
    timings = {
        "teacher_training_s": t1 - t0,
        "build_and_evaluate_s": t2 - t1,
        "latency_s": time.perf_counter() - t2,
        "build_workers": settings.build_workers(),
        "variants": {n: {"build_and_evaluate_s": build_s[n], "latency_s": latency_s[n]}
                     for n in names},
    }
    timings["total_s"] = time.perf_counter() - start
    report = {
        "data": {"name": data_name, "train": len(data.train.y), "val": len(data.val.y),
                 "test": len(data.test.y), "num_classes": data.num_classes,
                 "input_shape": list(data.train.x.shape[1:]), "models": pair.kind},
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"},
        "environment": environment(),
        "baseline": "baseline",
        "variants": rows,
        "learning_curves": {n: ctx.histories[n] for n in names if n in ctx.histories},
        "timings": timings,
    }
    render.write_all(report, out)
    return report
