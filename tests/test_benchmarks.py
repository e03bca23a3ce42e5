"""``benchmarks/``: every script's ``--smoke`` run in a subprocess, and ``benchmarks/_util``.

A smoke run uses tiny sizes and few repeats: it shows a broken benchmark fails CI, not how
fast anything is (no test depends on timing). It must exit 0, write a JSON with its
provenance into the folder it was given, and leave ``benchmarks/results/`` untouched. Smoke
runs compile at LLVM -O0 and share one session's persistent JAX compilation cache: they are
mostly compilation, and neither changes what is checked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")
                 and p.stem != "run_all")


def _util():
    spec = importlib.util.spec_from_file_location("_bench_util", BENCH / "_util.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results_digest() -> dict[str, str]:
    return {str(p.relative_to(RESULTS)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(RESULTS.rglob("*")) if p.is_file()}


def test_every_script_is_run_by_run_all():
    run_all = (BENCH / "run_all.py").read_text()
    for name in SCRIPTS:
        assert f'"{name}"' in run_all, f"benchmarks/run_all.py does not run {name}.py"


def test_run_all_reruns_every_results_file():
    spec = importlib.util.spec_from_file_location("_run_all", BENCH / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    written = {results for _, _, results in run_all.JOBS.values()}
    notes = {"ci_legs.json", "measure_issue14.json"}  # written by hand, not benchmark output
    on_disk = {p.name for p in RESULTS.glob("*.json")}
    assert on_disk - notes <= written, sorted(on_disk - notes - written)
    for script, _, _ in run_all.JOBS.values():
        assert (BENCH / f"{script}.py").is_file(), script


def test_fuzz_reach_reads_hypothesis_statistics():
    spec = importlib.util.spec_from_file_location("_fuzz_reach", BENCH / "fuzz_reach.py")
    fuzz_reach = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(fuzz_reach)
    finally:
        sys.path.remove(str(BENCH))
    text = """
tests/test_fuzz_x.py::test_f[valid]:

  - during reuse phase (0.01 seconds):
    - 2 passing, 0 failing, and 0 invalid test cases
    - Events:
      * 100.00%, properties checked

  - during generate phase (6.53 seconds):
    - Typical runtimes: ~ 3-49 ms, of which ~ 0-4 ms in data generation
    - 180 passing, 0 failing, and 20 invalid test cases
    - Events:
      * 81.00%, properties checked
      * 9.00%, invalid input: error checked
      * 90.00%, f: returned
      * 9.00%, f: ValueError
"""
    got = fuzz_reach.parse_statistics(text)["tests/test_fuzz_x.py::test_f[valid]"]
    # 81% of 200 test cases = 162 of the 180 examples run (rejected draws excluded)
    assert got["run"] == 180 and got["invalid"] == 20
    assert got["reach"] == 0.9 and got["error_checked"] == 0.1
    assert got["functions"] == ["f"]


@pytest.fixture(scope="session")
def smoke_compilation_cache(tmp_path_factory) -> dict[str, str]:
    """A persistent JAX compilation cache shared by this session's smoke runs (new each
    session): several scripts compile the same programs (the teacher's train and eval
    steps; both children of report_ab.py)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("smoke_jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_run_writes_json_with_provenance_and_leaves_results_alone(
        name, tmp_path, smoke_compilation_cache):
    source = (BENCH / f"{name}.py").read_text()
    if "--smoke" not in source:
        pytest.skip(f"benchmarks/{name}.py has no --smoke flag yet (its owner adds it)")
    if name == "quantization":  # its own test runs the same smoke run and checks its rows
        pytest.skip("run by tests/test_benchmark_quantization.py")
    if name == "one_shot":  # the real checkpoint ships in the `bench` extra, not `test`
        pytest.skip("one_shot.py needs the MiniLM checkpoint of the bench extra; its "
                    "algorithms are tested in tests/test_oneshot_*.py")
    # Scripts take --out-dir by name or through benchmarks/_util.add_common_args.
    takes_out_dir = "--out-dir" in source or "add_common_args(" in source
    args = ["--smoke"] + (["--out-dir", str(tmp_path)] if takes_out_dir else [])
    before = _results_digest()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           **smoke_compilation_cache}
    # The tests' 8 forced host devices are not what the scripts run with by default. LLVM
    # -O0 codegen: a smoke run is mostly XLA compilation and checks the JSON it writes, not
    # how fast anything runs or its figures (conftest.py keeps the default level for the
    # tests whose numerics it changes).
    env["XLA_FLAGS"] = SMOKE_XLA_FLAGS
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _results_digest() == before, f"{name} --smoke changed benchmarks/results/"
    written = list(tmp_path.glob("*.json"))
    if not takes_out_dir:
        return  # the script chose its own temporary folder
    assert len(written) == 1 and written[0].name.startswith(name), written
    result = json.loads(written[0].read_text())
    assert result["benchmark"] == written[0].stem and result["smoke"] is True
    prov = result["provenance"]
    for key in ("commit", "date_utc", "command", "machine", "versions"):
        assert prov[key], key
    assert "--smoke" in prov["command"]
    for key in ("cpu_model", "cores", "load_average_start", "load_average_end"):
        assert prov["machine"][key], key
    for key in ("jax", "jaxlib", "flax", "python"):
        assert prov["versions"][key], key


def test_run_all_rejects_unknown_benchmarks():
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr


# --- _util ------------------------------------------------------------------------------


def test_paired_ratio_is_the_median_of_per_round_ratios_with_its_spread():
    u = _util()
    num, den = [2.0, 3.0, 10.0, 4.0], [1.0, 1.0, 1.0, 4.0]  # ratios 2, 3, 10, 1
    r = u.paired_ratio(num, den)
    assert r["statistic"] == "median of per-round ratios"
    assert r["value"] == 2.5 and r["rounds"] == 4
    assert r["spread"]["min"] == 1.0 and r["spread"]["max"] == 10.0
    assert r["spread"]["q25"] <= r["value"] <= r["spread"]["q75"]
    assert r["ratio_of_medians"] == 3.5 / 1.0
    with pytest.raises(ValueError, match="equal"):
        u.paired_ratio([1.0], [1.0, 2.0])


def test_interleaved_seconds_pairs_rounds_and_alternates_order():
    u = _util()
    calls = []
    times = u.interleaved_seconds({"a": lambda: calls.append("a"),
                                   "b": lambda: calls.append("b")}, repeats=3, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in times.values()] == [3, 3]


def test_emit_refuses_a_smoke_run_into_results(tmp_path, capsys):
    u = _util()
    with pytest.raises(ValueError, match="smoke"):
        u.emit("x", {}, out_dir=u.RESULTS, smoke=True)
    path = u.emit("x", {"a": 1}, out_dir=str(tmp_path), smoke=True)
    capsys.readouterr()
    data = json.loads(pathlib.Path(path).read_text())
    assert data["a"] == 1 and data["smoke"] is True
    commit = data["provenance"]["commit"]
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40
    assert commit.endswith("-dirty") == bool(data["provenance"]["dirty_paths"])
