"""Writing the report: ``report.json``, ``report.md`` (a table) and ``pareto.png``."""

from __future__ import annotations

import json
import os
from typing import Any

COLUMNS = (
    # (header, row key, format)
    ("variant", "name", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("Δ acc (pp)", "accuracy_delta", "{:+.2f}"),
    ("macro F1", "f1_macro", "{:.4f}"),
    ("params", "params", "{:,}"),
    ("nonzero", "nonzero_params", "{:,}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("size (B)", "size_bytes", "{:,}"),
    ("size ×", "size_ratio", "{:.3f}"),
    ("b1 (ms)", "latency_b1_ms", "{:.3f}"),
    ("b1 ×", "latency_b1_ratio", "{:.2f}"),
    ("b256 (ms)", "latency_b256_ms", "{:.2f}"),
    ("b256 ×", "latency_b256_ratio", "{:.2f}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "accuracy_delta":
        value = 100 * value  # percentage points
    return fmt.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table (also what the command prints)."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, k, f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines)


def _atomic_write(path: str, write) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(report: dict[str, Any], path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


def markdown(report: dict[str, Any]) -> str:
    """The whole ``report.md``: settings, the table and what each variant is."""
    rows = report["variants"]
    s = report["settings"]
    lines = [
        "# jaxopt-lab report",
        "",
        f"Data: {report['data']['name']} ({report['data']['train']} train / "
        f"{report['data']['val']} val / {report['data']['test']} test examples, "
        f"{report['data']['num_classes']} classes). Seed {s['seed']}"
        f"{', quick settings' if s['quick'] else ''}. Figures on the test split; "
        "sizes are the bytes of the file `jol.save` wrote; latency is the median of "
        f"{s['latency_repeats']} timed runs at batch 1 and 256 on "
        f"{report['environment']['backend']} ({report['environment']['device_kind']}), "
        "× = ratio to the baseline measured in the same process.",
        "",
        table(rows),
        "",
        "## Variants",
        "",
    ]
    lines += [f"- **{r['name']}**: {r['description']}" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(markdown(report))

    _atomic_write(path, write)


_OFFSETS = ((5, 4), (5, -11), (-5, 4), (-5, -11), (5, 14), (5, -21), (-5, 14), (-5, -21))


def _label_points(ax, points: list[tuple[float, float, str]], fontsize: int = 8) -> None:
    """Annotates each point with its name, choosing offsets so that labels do not overlap.

    Greedy: each label takes the first candidate offset whose box (estimated from the
    text length) meets no label placed before it, else the least crowded one.
    """
    fig = ax.figure
    char_w, char_h = 0.62 * fontsize * fig.dpi / 72, fontsize * fig.dpi / 72
    placed = []
    for x, y, text in points:
        px, py = ax.transData.transform((x, y))
        w = char_w * len(text)
        best, best_hits = _OFFSETS[0], None
        for dx, dy in _OFFSETS:
            left = px + dx * fig.dpi / 72 - (w if dx < 0 else 0)
            bottom = py + dy * fig.dpi / 72
            box = (left, bottom, left + w, bottom + char_h)
            hits = sum(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1])
                       for b in placed)
            if best_hits is None or hits < best_hits:
                best, best_hits, best_box = (dx, dy), hits, box
            if hits == 0:
                break
        placed.append(best_box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=best, fontsize=fontsize,
                    ha="right" if best[0] < 0 else "left")


def plot_pareto(rows: list[dict[str, Any]], path: str) -> None:
    """Accuracy against saved size and against latency (batch 1 and 256), each labelled.

    Latency is plotted as the ratio to the baseline, which was timed alternately with each
    variant, so it is robust to changes of machine load during the job.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = (("size_bytes", "saved size (bytes)"),
              ("latency_b1_ratio", "latency / baseline, batch 1"),
              ("latency_b256_ratio", "latency / baseline, batch 256"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        xs = [row[key] for row in rows]
        ys = [100 * row["accuracy"] for row in rows]
        base = [i for i, row in enumerate(rows) if row["name"] == "baseline"]
        ax.scatter(xs, ys, s=30, c="C0", zorder=3)
        ax.scatter([xs[i] for i in base], [ys[i] for i in base], s=30, c="C3", zorder=4)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on log axes
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.canvas.draw()  # fixes every axis' data -> pixel transform for label placement
    for ax, (key, _) in zip(axes[0], panels):
        points = [(row[key], 100 * row["accuracy"], row["name"]) for row in rows]
        _label_points(ax, sorted(points))
    fig.suptitle("jaxopt-lab: accuracy against size and latency (up and left is better; "
                 "baseline in red)")

    def write(tmp):
        fig.savefig(tmp, dpi=110, format="png")

    _atomic_write(path, write)
    plt.close(fig)


def write_all(report: dict[str, Any], directory: str) -> dict[str, str]:
    """Writes the three report files into ``directory``; returns their paths."""
    paths = {name: os.path.join(directory, name)
             for name in ("report.json", "report.md", "pareto.png")}
    write_json(report, paths["report.json"])
    write_markdown(report, paths["report.md"])
    plot_pareto(report["variants"], paths["pareto.png"])
    return paths
