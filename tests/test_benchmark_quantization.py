"""benchmarks/quantization.py --smoke runs end to end (tiny sizes) and reports no failure."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_run_writes_every_latency_row(tmp_path):
    pytest.importorskip("qwix")  # the `bench` extra: Qwix runs side by side
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quantization
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "smoke.json"
    assert quantization.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["failed_sections"] == []
    row = result["latency"]["mlp"]["rows"]["batch_1"]
    for name in ("int8_weight_only", "int4_g128_weight_only", "w8a8_static", "w8a8_dynamic",
                 "qwix_int8_weight_only", "qwix_int4_group128"):
        assert name in row["speedup_vs_fp32"]
    # Bytes moved per call for every weight layout measured (W8A8 included since the
    # roofline covers it too).
    assert {"fp32", "int8_weight_only", "int4_g128_weight_only", "w8a8_static"} <= set(
        row["memory_bound"])
    assert result["latency"]["resnet18_like"]["rows"]["batch_1"]["median_ms"]["w8a8_static"] > 0
