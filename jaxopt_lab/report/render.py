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


def plot_pareto(rows: list[dict[str, Any]], path: str) -> None:
    """Accuracy against saved size and against latency (batch 1 and 256), labelled."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = (("size_bytes", "saved size (bytes)"), ("latency_b1_ms", "latency, batch 1 (ms)"),
              ("latency_b256_ms", "latency, batch 256 (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for row in rows:
            x, y = row[key], 100 * row["accuracy"]
            ax.scatter([x], [y], s=30, color="C3" if row["name"] == "baseline" else "C0")
            ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("jaxopt-lab: accuracy against size and latency (up and left is better)")
    fig.tight_layout()

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
