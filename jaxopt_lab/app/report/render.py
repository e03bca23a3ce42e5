"""Writing the report: ``report.json``, ``report.md``, ``report.html`` and the plots.

``pareto.png`` draws accuracy (with its Wilson 95% interval as error bars) against saved
size and per-call latency, the Pareto front of each panel as a line, one colour per
technique family, and each point numbered (the legend and the table give the numbers), so
labels stay short and do not pile up where variants coincide. ``learning_curves.png``
shows each training run's validation accuracy and training loss per epoch.
``report.html`` holds the table and both plots (embedded as base64) in one file that a
browser opens offline.
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any

from jaxopt_lab.app.report.settings import FAMILIES

PLOTS = ("pareto.png", "learning_curves.png")

COLUMNS = (
    # (header, row key, format); "accuracy" also prints its interval, see _cell.
    ("#", "number", "{}"),
    ("variant", "name", "{}"),
    ("family", "family", "{}"),
    ("test acc (95% CI)", "accuracy", "{:.4f}"),
    ("Δ acc (pp)", "accuracy_delta", "{:+.2f}"),
    ("train acc", "train_accuracy", "{:.4f}"),
    ("val acc", "val_accuracy", "{:.4f}"),
    ("macro F1", "f1_macro", "{:.4f}"),
    ("params", "params", "{:,}"),
    ("nonzero", "nonzero_params", "{:,}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("size (B)", "size_bytes", "{:,}"),
    ("size ×", "size_ratio", "{:.3f}"),
    ("memory b256 (B)", "memory_b256_bytes", "{:,}"),
    ("b1 (ms)", "latency_b1_ms", "{:.3f}"),
    ("b1 ×", "latency_b1_ratio", "{:.2f}"),
    ("b256 (ms)", "latency_b256_ms", "{:.2f}"),
    ("b256 ×", "latency_b256_ratio", "{:.2f}"),
)

# Panels of the Pareto plot: (row key, axis label); lower is better on every x axis.
PANELS = (("size_bytes", "saved size (bytes, log scale)"),
          ("latency_b1_ms", "latency per call, batch 1 (ms, log scale)"),
          ("latency_b256_ms", "latency per call, batch 256 (ms, log scale)"))
FAMILY_ORDER = ("baseline", "folding", "quantization", "pruning", "distillation", "composed",
                "other")


def family(name: str) -> str:
    """The technique family a variant belongs to (its colour in the plots)."""
    return FAMILIES.get(name, "other")


def _numbered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"number": i + 1, "family": family(r["name"]), **r} for i, r in enumerate(rows)]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "accuracy_delta":
        value = 100 * value  # percentage points
    text = fmt.format(value)
    if key == "accuracy" and "accuracy_ci_low" in row:
        text += f" [{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}]"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table (also what the command prints)."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("name", "family") else "---:"
                            for _, k, _ in COLUMNS) + "|"]
    for row in _numbered(rows):
        lines.append("| " + " | ".join(_cell(row, k, f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines)


def html_table(rows: list[dict[str, Any]]) -> str:
    """The same table as HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row, k, f))}</td>" for _, k, f in COLUMNS)
        + "</tr>" for row in _numbered(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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


def _summary(report: dict[str, Any]) -> str:
    s, d, env = report["settings"], report["data"], report["environment"]
    return (
        f"Data: {d['name']} ({d['train']} train / {d['val']} val / {d['test']} test "
        f"examples, {d['num_classes']} classes). Seed {s['seed']}"
        f"{', quick settings' if s['quick'] else ''}. Accuracy is on the test split, with "
        f"its Wilson 95% interval for {d['test']} examples (one example is "
        f"{100 / max(d['test'], 1):.2f} points); train and val accuracy show over- or "
        "underfitting. Sizes are the bytes of the file `jol.save` wrote; memory is the "
        "resident weights plus XLA's temporary buffers of one batch-256 call (on CPU read "
        "from the program compiled without YNNPACK fusion, whose buffers XLA cannot see). "
        "Latency is "
        f"the median of {s['latency_repeats']} single blocked calls at batch 1 and 256 on "
        f"{env['backend']} ({env['device_kind']}), alternating with the baseline's; every "
        "× is the quotient of two figures in the table (the baseline's figure pools all its "
        "alternated calls)."
    )


def markdown(report: dict[str, Any]) -> str:
    """The whole ``report.md``: settings, the table, the plots and what each variant is."""
    rows = report["variants"]
    lines = ["# jaxopt-lab report", "", _summary(report), "", table(rows), "",
             "![accuracy against size and latency](pareto.png)", ""]
    if report.get("learning_curves"):
        lines += ["![learning curves](learning_curves.png)", ""]
    lines += ["## Variants", ""]
    lines += [f"- **{r['name']}**: {r['description']}" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(markdown(report))

    _atomic_write(path, write)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower ``x`` and higher ``y``), by ``x``.

    A point is on the front when every point with an ``x`` at most its own has a lower
    ``y`` (ties in ``x`` keep the most accurate).

    Examples:
      >>> pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.2)])
      [3, 0, 1]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


_OFFSETS = ((4, 3), (4, -10), (-4, 3), (-4, -10), (4, 12), (4, -19), (-4, 12), (-4, -19),
            (10, -4), (-10, -4), (0, 16), (0, -24))


def _label_points(ax, points: list[tuple[float, float, str]], fontsize: int = 8) -> None:
    """Annotates each point with its (short) number, choosing offsets so labels do not
    overlap: each takes the first candidate offset whose box meets no label placed before
    it, else the least crowded one."""
    fig = ax.figure
    char_w, char_h = 0.62 * fontsize * fig.dpi / 72, fontsize * fig.dpi / 72
    placed = []
    for x, y, text in points:
        px, py = ax.transData.transform((x, y))
        w = char_w * len(text)
        best, best_hits, best_box = _OFFSETS[0], None, None
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


def _colours() -> dict[str, str]:
    return {f: f"C{i}" for i, f in enumerate(FAMILY_ORDER)}


def plot_pareto(rows: list[dict[str, Any]], path: str) -> None:
    """Accuracy (Wilson 95% error bars) against saved size and per-call latency.

    Each panel draws its Pareto front as a line; colours are technique families; points
    carry their table number, and the legend names them.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    rows = _numbered(rows)
    colours = _colours()
    panels = [(k, label) for k, label in PANELS if all(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 2.6, 5.2),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        xs = [row[key] for row in rows]
        ys = [100 * row["accuracy"] for row in rows]
        lo = [100 * (r["accuracy"] - r.get("accuracy_ci_low", r["accuracy"])) for r in rows]
        hi = [100 * (r.get("accuracy_ci_high", r["accuracy"]) - r["accuracy"]) for r in rows]
        for i, row in enumerate(rows):
            ax.errorbar(xs[i], ys[i], yerr=[[lo[i]], [hi[i]]], fmt="o", ms=5, capsize=2,
                        color=colours[row["family"]], zorder=3)
        front = pareto_front(list(zip(xs, ys)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="0.35", lw=1.2,
                zorder=2, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on log axes
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%), Wilson 95% interval")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.2, y=0.1)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (5.6 * len(panels) + 2.6), 0.93))
    fig.canvas.draw()  # fixes every axis' data -> pixel transform for label placement
    for ax, (key, _) in zip(axes[0], panels):
        points = [(row[key], 100 * row["accuracy"], str(row["number"])) for row in rows]
        _label_points(ax, sorted(points))
    families = [f for f in FAMILY_ORDER if any(r["family"] == f for r in rows)]
    handles = [Line2D([], [], marker="o", ls="", color=colours[f], label=f) for f in families]
    handles.append(Line2D([], [], color="0.35", label="Pareto front"))
    handles += [Line2D([], [], ls="", label=f"{r['number']}  {r['name']}") for r in rows]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False,
               handlelength=1.0)
    fig.suptitle("jaxopt-lab: accuracy against size and latency (up and left is better)")

    def write(tmp):
        fig.savefig(tmp, dpi=110, format="png")

    _atomic_write(path, write)
    plt.close(fig)


def plot_learning_curves(curves: dict[str, list[dict[str, Any]]], path: str) -> None:
    """Validation accuracy and training loss per epoch of every training run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = _colours()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = ("-", "--", ":", "-.")
    for name, runs in curves.items():
        for k, run in enumerate(runs):
            epochs = range(1, len(run["val_accuracy"]) + 1)
            label = name if len(runs) == 1 else f"{name} ({k + 1})"
            style = dict(color=colours[family(name)], ls=styles[k % len(styles)], marker=".")
            acc_ax.plot(epochs, [100 * v for v in run["val_accuracy"]], label=label, **style)
            loss_ax.plot(epochs, run["train_loss"], label=label, **style)
            if run.get("stopped_early"):
                acc_ax.axvline(run["best_epoch"], color=style["color"], alpha=0.25, lw=0.8)
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy (%)",
               title="validation accuracy (thin line: best epoch of an early stop)")
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, dpi=110, format="png")

    _atomic_write(path, write)
    plt.close(fig)


def html_page(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """A self-contained ``report.html``: the table, the plots (base64) and the variants."""
    rows = report["variants"]
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode("ascii")}"></figure>'
        for name, data in images.items())
    variants = "".join(f"<li><b>{html.escape(r['name'])}</b>: {html.escape(r['description'])}"
                       "</li>" for r in rows)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1600px}"
             "table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:nth-child(2),td:nth-child(3){text-align:left}"
             "img{max-width:100%}")
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>jaxopt-lab report</title><style>{style}</style></head><body>"
        f"<h1>jaxopt-lab report</h1><p>{html.escape(_summary(report))}</p>"
        f"{html_table(rows)}{figures}<h2>Variants</h2><ul>{variants}</ul></body></html>\n"
    )


def write_all(report: dict[str, Any], directory: str) -> dict[str, str]:
    """Writes ``report.json``, ``report.md``, the plots and ``report.html`` into
    ``directory``; returns their paths by file name."""
    paths = {name: os.path.join(directory, name)
             for name in ("report.json", "report.md", "pareto.png", "report.html")}
    write_json(report, paths["report.json"])
    write_markdown(report, paths["report.md"])
    plot_pareto(report["variants"], paths["pareto.png"])
    if report.get("learning_curves"):
        paths["learning_curves.png"] = os.path.join(directory, "learning_curves.png")
        plot_learning_curves(report["learning_curves"], paths["learning_curves.png"])
    images = {}
    for name in PLOTS:
        if name in paths:
            with open(paths[name], "rb") as f:
                images[name] = f.read()

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(html_page(report, images))

    _atomic_write(paths["report.html"], write)
    return paths
