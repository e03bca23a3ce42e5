"""Report rendering: the table, report.md, report.json, report.html and the plots."""

import json
import re
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_lab.app.report import render


def _row(name, acc, size, b1=0.1, b256=2.0, **extra):
    return {"name": name, "description": f"{name} made somehow", "accuracy": acc,
            "accuracy_delta": acc - 0.98, "f1_macro": acc, "params": 1000, "nonzero_params": 500,
            "sparsity": 0.5, "size_bytes": size, "size_ratio": size / 4000,
            "latency_b1_ms": b1, "latency_b1_ratio": 1.0, "latency_b256_ms": b256,
            "latency_b256_ratio": 1.0, "accuracy_ci_low": acc - 0.02,
            "accuracy_ci_high": min(1.0, acc + 0.01), "train_accuracy": 1.0,
            "val_accuracy": acc, "memory_b256_bytes": 2 * size, **extra}


ROWS = [_row("baseline", 0.98, 4000), _row("int8_ptq", 0.975, 1000, b1=0.2),
        _row("pipeline", 0.97, 200, b256=0.5, sparsity_target=0.5)]
REPORT = {"variants": ROWS, "data": {"name": "digits", "train": 10, "val": 2, "test": 3,
                                     "num_classes": 10},
          "settings": {"seed": 0, "quick": True, "latency_repeats": 3},
          "environment": {"backend": "cpu", "device_kind": "cpu"},
          "learning_curves": {"baseline": [{"train_loss": [1.0, 0.5, 0.4],
                                            "val_accuracy": [0.8, 0.9, 0.85], "best_epoch": 2,
                                            "stopped_early": True}]}}


def test_table_has_a_row_per_variant_and_every_column():
    lines = render.table(ROWS).splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert all(line.count("|") == len(render.COLUMNS) + 1 for line in lines)
    assert "| 2 | int8_ptq | quantization | 0.9750 [0.955, 0.985] | -0.50 |" in lines[3]
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


FILES = ["learning_curves.png", "pareto.png", "report.html", "report.json", "report.md"]


def test_write_all(tmp_path):
    paths = render.write_all(REPORT, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES
    assert json.loads((tmp_path / "report.json").read_text()) == REPORT
    for name in ("pareto.png", "learning_curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert set(paths) == set(FILES)


def test_html_is_self_contained(tmp_path):
    render.write_all(REPORT, str(tmp_path))
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch
    assert "<td>int8_ptq</td>" in page and "pipeline made somehow" in page


def test_ratios_are_quotients_of_the_printed_figures():
    rows = [_row("baseline", 0.98, 4000, b1=0.2, b256=2.0),
            _row("int8_ptq", 0.97, 1000, b1=0.3, b256=1.0)]
    for row in rows:
        for b in (1, 256):
            row[f"latency_b{b}_ratio"] = row[f"latency_b{b}_ms"] / rows[0][f"latency_b{b}_ms"]
    line = render.table(rows).splitlines()[3].split("|")
    headers = [h for h, _, _ in render.COLUMNS]
    cell = {h: line[i + 1].strip() for i, h in enumerate(headers)}
    assert float(cell["b1 ×"]) == pytest.approx(float(cell["b1 (ms)"]) / 0.2, abs=0.01)
    assert float(cell["b256 ×"]) == pytest.approx(float(cell["b256 (ms)"]) / 2.0, abs=0.01)
    assert float(cell["size ×"]) == pytest.approx(1000 / 4000, abs=1e-3)


@given(st.lists(st.tuples(st.floats(0.1, 1e6), st.floats(0.0, 1.0)), min_size=1,
                max_size=12))
def test_pareto_front_is_exactly_the_undominated_points(points):
    front = render.pareto_front(points)
    xs = [points[i][0] for i in front]
    assert xs == sorted(xs)
    for i, (x, y) in enumerate(points):
        beaten = any((x2 <= x and y2 > y) or (x2 < x and y2 >= y) for x2, y2 in points)
        if i in front:
            assert not beaten
        elif not beaten:  # an exact duplicate of a front point
            assert any(points[j] == (x, y) for j in front)


def test_html_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    render.write_all(REPORT, str(tmp_path))
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--window-size=1400,1600", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 20_000, len(data)  # more than a blank page
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom",
         (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert "jaxopt-lab report" in dom.stdout and dom.stdout.count("<img") == 2


def test_write_json_refuses_non_finite_free_text_gracefully(tmp_path):
    with pytest.raises(TypeError):
        render.write_json({"x": object()}, str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()
