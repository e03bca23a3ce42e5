"""Report rendering: the table, report.md, report.json and the Pareto plot."""

import json

import pytest

from jaxopt_lab.report import render


def _row(name, acc, size, b1=0.1, b256=2.0, **extra):
    return {"name": name, "description": f"{name} made somehow", "accuracy": acc,
            "accuracy_delta": acc - 0.98, "f1_macro": acc, "params": 1000, "nonzero_params": 500,
            "sparsity": 0.5, "size_bytes": size, "size_ratio": size / 4000,
            "latency_b1_ms": b1, "latency_b1_ratio": 1.0, "latency_b256_ms": b256,
            "latency_b256_ratio": 1.0, **extra}


ROWS = [_row("baseline", 0.98, 4000), _row("int8_ptq", 0.975, 1000, b1=0.2),
        _row("pipeline", 0.97, 200, b256=0.5, sparsity_target=0.5)]
REPORT = {"variants": ROWS, "data": {"name": "digits", "train": 10, "val": 2, "test": 3,
                                     "num_classes": 10},
          "settings": {"seed": 0, "quick": True, "latency_repeats": 3},
          "environment": {"backend": "cpu", "device_kind": "cpu"}}


def test_table_has_a_row_per_variant_and_every_column():
    lines = render.table(ROWS).splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert all(line.count("|") == len(render.COLUMNS) + 1 for line in lines)
    assert "| int8_ptq | 0.9750 | -0.50 |" in lines[3]
    assert "1,000" in lines[3] and "4,000" in lines[2]


def test_missing_figures_render_as_dash():
    row = dict(ROWS[0])
    del row["latency_b1_ms"]
    assert "| - |" in render.table([row])


def test_markdown_describes_the_run():
    md = render.markdown(REPORT)
    assert md.startswith("# jaxopt-lab report")
    assert "Seed 0, quick settings" in md and "**pipeline**: pipeline made somehow" in md
    assert render.table(ROWS) in md


def test_write_all(tmp_path):
    paths = render.write_all(REPORT, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png", "report.json",
                                                           "report.md"]
    assert json.loads((tmp_path / "report.json").read_text()) == REPORT
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert set(paths) == {"report.json", "report.md", "pareto.png"}


def test_write_json_refuses_non_finite_free_text_gracefully(tmp_path):
    with pytest.raises(TypeError):
        render.write_json({"x": object()}, str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()
