"""README's benchmark figures against the results JSON they come from, and that JSON's age.

Driven by the explicit tables below (README phrase -> results file -> JSON key -> rounding):
when a benchmark is re-measured, its figures here and in the README change together. A
figure fails when the README no longer holds its phrase, or when its number is not the JSON
value rounded as the table says. A CPU results file in ``FIGURES`` fails when the commit it
records is older than the last commit touching the code it measures (``SOURCES``), when it
records none, or when it was measured with that code uncommitted. ``GPU_FIGURES`` are held to
their JSON but not to its age: no CPU run can re-measure them (the README says so). And every
figure in the README's Benchmarks section must be in one of the tables.

After ``python benchmarks/run_all.py``, a failure names the phrase, the README number and the
JSON value: update the README (and this table, if a figure moved in the JSON).
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import subprocess
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Figure:
    phrase: str  # README text, whitespace-insensitive, "{}" where the number stands
    results: str  # file under benchmarks/results/
    key: str  # dotted JSON key ("a.b[0].c"); in a .txt file "<line start>:<word before number>"
    digits: int  # decimals the README rounds to
    scale: float = 1.0  # README number = JSON value * scale (e.g. bytes -> MiB)


_Q = "mlp_1024_4096_1024."
_R = "speedup_vs_fp32_median_of_round_ratios."
_L = "quantization_latency.json"
_M = "latency.mlp.rows."
_C = "latency.resnet18_like.rows."
_AB = "after_over_before_relative_to_fp32."
FIGURES: tuple[Figure, ...] = (
    Figure("batch 1: fp32 {} ms;", _L, _M + "batch_1.median_ms.fp32", 2),
    Figure("int8 weight-only {}x, int4-g128 weight-only", _L, _M + "batch_1." + _R
           + "int8_weight_only", 2),
    Figure("int4-g128 weight-only {}x, W8A8 dynamic", _L, _M + "batch_1." + _R
           + "int4_g128_weight_only", 2),
    Figure("W8A8 dynamic {}x; Qwix's", _L, _M + "batch_1." + _R + "w8a8_dynamic", 2),
    Figure("Qwix's int8 weight-only {}x.", _L, _M + "batch_1." + _R + "qwix_int8_weight_only",
           2),
    Figure("weights at {}% of the one-thread", _L, _M + "batch_1.memory_bound."
           "int8_weight_only.fraction_of_limit.one_thread", 0, 100),
    Figure("read bandwidth ({} GB/s)", _L, "latency.read_bandwidth.one_thread_gb_per_s", 2),
    Figure("batch 16: int8 weight-only {}x", _L, _M + "batch_16." + _R + "int8_weight_only",
           2),
    Figure("batch 16: int8 weight-only {:skip}x, int4-g128 {}x", _L, _M + "batch_16." + _R
           + "int4_g128_weight_only", 2),
    Figure("int4-g128 {:skip}x, W8A8 dynamic {}x.", _L, _M + "batch_16." + _R
           + "w8a8_dynamic", 2),
    Figure("batch 1024: int8 weight-only {}x", _L, _M + "batch_1024." + _R
           + "int8_weight_only", 2),
    Figure("batch 1024: int8 weight-only {:skip}x, int4-g128 {}x", _L, _M + "batch_1024."
           + _R + "int4_g128_weight_only", 2),
    Figure("W8A8 dynamic {}x / static", _L, _M + "batch_1024." + _R + "w8a8_dynamic", 2),
    Figure("/ static {}x.", _L, _M + "batch_1024." + _R + "w8a8_static", 2),
    Figure("at batch 1: int8 weight-only {}x", _L, _C + "batch_1." + _R + "int8_weight_only",
           2),
    Figure("W8A8 static {}x; at batch 8", _L, _C + "batch_1." + _R + "w8a8_static", 2),
    Figure("at batch 8: int8 weight-only {}x", _L, _C + "batch_8." + _R + "int8_weight_only",
           2),
    Figure("a small MLP takes {} s", "eager.json",
           "quantize_first_call.after.first_call_s_median", 2),
    Figure("(was {} s); `jaxopt-lab --help`", "eager.json",
           "quantize_first_call.before.first_call_s_median", 2),
    Figure("answers in {} s", "eager.json", "cli_help.after.help_wall_s_median", 2),
    Figure("answers in {:skip} s (was {} s)", "eager.json", "cli_help.before.help_wall_s_median",
           2),
    Figure("takes {} ms after its first call", "eager.json",
           "prune_update.later_call_median_ms", 2),
    Figure("(adam alone {} ms)", "eager.json", "prune_update.plain_adam_later_call_median_ms",
           2),
    Figure("takes {}x the time it did on the MLP", "refactor_ab.json",
           _AB + "mlp_b1/int8_weight_only", 2),
    Figure("and {}x on the conv net at batch 16", "refactor_ab.json",
           _AB + "conv_b16/int8_weight_only", 2),
    Figure("tree is slower ({} ms,", "refactor_ab.json",
           "median_seconds.after.mlp/quantize_int8_eager", 2, 1000),
    Figure("was {} ms: the host-side", "refactor_ab.json",
           "median_seconds.before.mlp/quantize_int8_eager", 2, 1000),
    Figure("`jax.jit(jol.quantize)` ({} ms)", "refactor_ab.json",
           "median_seconds.after.mlp/quantize_int8_jit", 2, 1000),
    Figure("included (`one_shot_timing.json`): {} s cold", "one_shot_timing.json",
           "seconds.cold_compile_included", 2),
    Figure("s cold, then {} s and", "one_shot_timing.json", "seconds.warm_runs[0]", 2),
    Figure("s and {} s warm", "one_shot_timing.json", "seconds.warm_runs[1]", 2),
    Figure("(`scale.json`) is {} MiB for int8", "scale.json", "results[0].peak_over_input_bytes",
           0, 2**-20),
    Figure("MiB for int8 quantization, {} MiB for int4", "scale.json",
           "results[1].peak_over_input_bytes", 0, 2**-20),
    Figure("int4 and {} MiB for a 50%", "scale.json", "results[3].peak_over_input_bytes", 0,
           2**-20),
    Figure("largest leaf ({},", "scale.json", "results[0].bound_bytes", 0, 2**-20),
    Figure("largest leaf ({:skip}, {} and", "scale.json", "results[1].bound_bytes", 0, 2**-20),
    Figure("and {} MiB). On 2 processes", "scale.json", "results[3].bound_bytes", 0, 2**-20),
    Figure("the mask peaks at {} MiB in process 0", "scale_2proc.json",
           "results[6].peak_over_input_bytes", 0, 2**-20),
    Figure("against a bound of {} MiB. No program", "scale_2proc.json", "results[6].bound_bytes",
           0, 2**-20),
)

# Measured on a GPU at an older commit (README says which): value-checked only.
GPU_FIGURES = (
    Figure("forward: {} ms fp32", "gpu/quantization.json", _Q + "median_ms.fp32", 2),
    Figure("weight-only int8 {}x and W8A8", "gpu/quantization.json",
           _Q + _R + "weight_only_int8", 2),
    Figure("and W8A8 {}x (dynamic)", "gpu/quantization.json", _Q + _R + "w8a8_dynamic", 2),
    Figure("(dynamic) / {}x (static) as fast", "gpu/quantization.json",
           _Q + _R + "w8a8_static", 2),
    Figure("configurations take {}x one configuration's", "gpu/sweep.json",
           "sweeps[0].vmapped_over_single_run", 2),
    Figure("sparsity sweep ({}x faster", "gpu/sweep.json",
           "sweeps[0].sequential_over_vmapped_run", 1),
    Figure("and {}x for the learning-rate", "gpu/sweep.json",
           "sweeps[1].vmapped_over_single_run", 2),
    Figure("learning-rate sweep ({}x faster", "gpu/sweep.json",
           "sweeps[1].sequential_over_vmapped_run", 1),
    Figure("ordinary step costs {}x a plain adam step", "gpu/pruning.json",
           "overhead.ordinary_over_plain.paired_median_ratio", 2),
    Figure("a recompute {}x an ordinary step", "gpu/pruning.json",
           "overhead.recompute_over_ordinary.paired_median_ratio", 2),
    Figure("update alone costs {}x and", "gpu/prune_step_variants.txt", "negp:paired", 2),
    Figure("cheap branch nothing more ({}x)", "gpu/prune_step_variants.txt",
           "cond_negp:paired", 2),
    Figure("`lax.cond` makes it {}x", "gpu/prune_step_variants.txt", "prune:paired", 2),
)

# The code each CPU results file measures: a commit to any of these makes the file stale.
_COMMON = ("benchmarks/_util.py", "jaxopt_lab/_select.py", "jaxopt_lab/train")
SOURCES = {
    "quantization.json": ("benchmarks/quantization.py", "jaxopt_lab/quant", "jaxopt_lab/fold",
                          *_COMMON),
    "pruning.json": ("benchmarks/pruning.py", "jaxopt_lab/pruning", *_COMMON),
    "prune_step_variants.json": ("benchmarks/prune_step_variants.py", "benchmarks/pruning.py",
                                 "jaxopt_lab/pruning", *_COMMON),
    "sweep.json": ("benchmarks/sweep.py", "jaxopt_lab/app/sweeps.py", "jaxopt_lab/pruning",
                   *_COMMON),
    "quantization_latency.json": ("benchmarks/quantization.py", "jaxopt_lab/quant",
                                  "jaxopt_lab/core", "jaxopt_lab/app/models.py", *_COMMON),
    "eager.json": ("benchmarks/eager.py", "jaxopt_lab/quant", "jaxopt_lab/pruning",
                   "jaxopt_lab/__init__.py", "jaxopt_lab/app/cli.py", *_COMMON),
    "refactor_ab.json": ("benchmarks/refactor_ab.py", "jaxopt_lab/quant", "jaxopt_lab/core",
                         *_COMMON),
    "scale.json": ("benchmarks/scale.py", "jaxopt_lab/quant", "jaxopt_lab/pruning", *_COMMON),
    "scale_2proc.json": ("benchmarks/scale.py", "jaxopt_lab/quant", "jaxopt_lab/pruning",
                         *_COMMON),
    "one_shot_timing.json": ("benchmarks/one_shot.py", "benchmarks/_minilm.py",
                             "jaxopt_lab/oneshot", "jaxopt_lab/quant", "jaxopt_lab/core",
                             *_COMMON),
}


# --- reading ----------------------------------------------------------------------------


def _squash(text: str) -> str:
    return " ".join(text.split())


@functools.cache
def _benchmarks_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Benchmarks")
    end = readme.index("\n## ", start + 1)
    return _squash(readme[start:end])


@functools.cache
def _load(results: str):
    path = RESULTS / results
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return path.read_text()


def _lookup(data, key: str):
    """The value at a dotted key (``a.b[0].c``) of a JSON, or a ``.txt`` table's cell."""
    if isinstance(data, str):  # "<line start>:<word>": the number after <word> on that line
        start, word = key.split(":")
        for line in data.splitlines():
            if line.split()[:1] == [start]:
                return float(re.search(rf"\b{word} (-?[0-9.]+)", line).group(1))
        raise KeyError(key)
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        data = data[int(part[1:-1])] if part.startswith("[") else data[part]
    return data


_NUMBER = r"(-?[0-9]+(?:\.[0-9]+)?)"


def _readme_number(fig: Figure) -> tuple[str, re.Match]:
    """The number the README gives for ``fig`` (``{:skip}`` stands for a number not read)."""
    pattern = re.escape(_squash(fig.phrase)).replace(r"\{:skip\}", r"-?[0-9.]+")
    match = re.search(pattern.replace(r"\{\}", _NUMBER), _benchmarks_section())
    assert match, f"README's Benchmarks section no longer says {fig.phrase!r}"
    return match.group(1), match


def _figure_id(fig: Figure) -> str:
    return f"{fig.results}:{fig.key}"


@pytest.mark.parametrize("fig", FIGURES + GPU_FIGURES, ids=_figure_id)
def test_readme_figure_is_its_json_value_rounded(fig):
    quoted, _ = _readme_number(fig)
    try:
        value = _lookup(_load(fig.results), fig.key)
    except (KeyError, IndexError, TypeError) as e:
        pytest.fail(f"{fig.results} has no {fig.key} ({e!r}); README quotes {quoted} for "
                    f"{fig.phrase!r}: re-measure (benchmarks/run_all.py) or fix the table")
    assert isinstance(value, (int, float)), (fig.key, value)
    want = f"{round(value * fig.scale, fig.digits):.{fig.digits}f}"
    assert quoted == want, (f"README says {quoted} for {fig.phrase!r}, {fig.results} "
                            f"{fig.key} = {value!r} rounds to {want}")


def test_every_benchmark_figure_in_the_readme_is_in_a_table():
    text = list(_benchmarks_section())
    for fig in FIGURES + GPU_FIGURES:  # blank each checked number where it stands
        _, match = _readme_number(fig)
        start, end = match.span(1)
        text[start:end] = "#" * (end - start)
    text = "".join(text)
    # Results are quoted as ratios (x), times (ms) and sizes (MiB) or accuracy points.
    loose = re.findall(r"\S*\b[0-9]+(?:\.[0-9]+)?(?:x\b| ?ms\b| MiB\b| points\b)", text)
    assert not loose, f"README benchmark figures in no table of this file: {loose}"


# --- age --------------------------------------------------------------------------------


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _provenance_scopes() -> list[tuple[str, str]]:
    """(results file, key prefix holding a ``provenance``) for every CPU figure's scope."""
    scopes = set()
    for fig in FIGURES:
        data, prefix = _load(fig.results), ""
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", fig.key)
        for i, part in enumerate(parts):
            try:
                data = data[int(part[1:-1])] if part.startswith("[") else data[part]
            except (KeyError, IndexError, TypeError):
                break
            if isinstance(data, dict) and "provenance" in data:
                prefix = ".".join(parts[: i + 1])
        scopes.add((fig.results, prefix))
    return sorted(scopes)


@pytest.mark.parametrize("results, scope", _provenance_scopes(),
                         ids=lambda v: v or "<whole file>")
def test_results_are_not_older_than_the_code_they_measure(results, scope):
    sources = SOURCES[results]
    data = _load(results)
    prov = (_lookup(data, scope) if scope else data).get("provenance")
    where = f"{results}{' ' + scope if scope else ''}"
    assert prov and prov.get("commit", "unknown") != "unknown", (
        f"{where} records no commit: re-measure with python benchmarks/run_all.py")
    assert not data.get("smoke"), f"{results} holds a --smoke run's figures"
    measured = prov["commit"].removesuffix("-dirty")
    dirty = [p for p in prov.get("dirty_paths", [])
             if any(p == s or p.startswith(s.rstrip("/") + "/") for s in sources)]
    assert not dirty, f"{where} was measured with uncommitted changes to {dirty}"
    last = _git("log", "-1", "--format=%H", "--", *sources).stdout.strip()
    assert last, f"no commit touches {sources}"
    check = _git("merge-base", "--is-ancestor", last, measured)
    assert check.returncode == 0, (
        f"{where} was measured at {measured[:10]}, before {last[:10]} changed the code it "
        f"measures ({', '.join(sources)}): re-measure with python benchmarks/run_all.py"
        + (f" ({check.stderr.strip()})" if check.returncode != 1 else ""))


def test_every_cpu_results_file_in_the_table_has_its_sources():
    assert {fig.results for fig in FIGURES} <= set(SOURCES)
    for paths in SOURCES.values():
        for p in paths:
            assert (ROOT / p).exists(), p
