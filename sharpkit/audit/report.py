"""The audit report: a sorted table, and each metric plotted against the checkpoints' step, in a
self-contained HTML file (figures embedded as base64 PNG)."""
from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_write_text

__all__ = ["sort_rows", "format_table", "render_html", "write_html"]


def _position(row: dict[str, Any]) -> tuple:
    step, epoch = row.get("step"), row.get("epoch")
    return (step is None and epoch is None, epoch if epoch is not None else -1, step if step is not None else -1, row.get("name", ""))


def sort_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ordered by epoch, then step (as parsed from the names), then name; unnumbered last."""
    return sorted(rows, key=_position)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _columns(metrics: Sequence[str]) -> list[str]:
    return ["name", "epoch", "step", "status", "loss", *metrics]


def format_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """A plain-text table of the sorted rows (errors show their message after the table)."""
    cols = _columns(metrics)
    body = [[_fmt(r.get(c)) for c in cols] for r in sort_rows(rows)]
    widths = [max(len(c), *(len(line[i]) for line in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in body]
    errors = [r for r in sort_rows(rows) if r.get("status") == "error"]
    if errors:
        lines.append("")
        lines += [f"error: {r.get('name')}: {r.get('error')}" for r in errors]
    return "\n".join(lines)


def _x_axis(rows: list[dict[str, Any]]) -> tuple[str, list[float]]:
    if rows and all(r.get("step") is not None for r in rows):
        return "step", [r["step"] for r in rows]
    if rows and all(r.get("epoch") is not None for r in rows):
        return "epoch", [r["epoch"] for r in rows]
    return "checkpoint (sorted by name)", list(range(len(rows)))


def _plot(rows: list[dict[str, Any]], metric: str) -> str:
    """One metric against step as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    label, xs = _x_axis(rows)
    ys = [r.get(metric) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    try:
        ax.plot(xs, ys, marker="o", lw=1.5)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {label.split(' ')[0]}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(rows: Sequence[dict[str, Any]], metrics: Sequence[str], title: str = "sharpkit audit") -> str:
    """The report as one HTML string: table of all rows, then one figure per metric (ok rows)."""
    ordered = sort_rows(rows)
    cols = _columns(metrics)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "<th>error</th>"
    body = []
    for r in ordered:
        cls = ' class="err"' if r.get("status") == "error" else ""
        cells = "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols)
        body.append(f"<tr{cls}>{cells}<td>{html.escape(r.get('error') or '')}</td></tr>")
    ok = [r for r in ordered if r.get("status") == "ok"]
    figures = []
    for m in ("loss", *metrics):
        if ok:
            figures.append(f'<figure><img alt="{html.escape(m)}" src="data:image/png;base64,{_plot(ok, m)}"></figure>')
    config = ordered[0].get("config", {}) if ordered else {}
    n_err = sum(r.get("status") == "error" for r in ordered)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
tr.err td {{ background: #fdd; }} figure {{ display: inline-block; margin: 0.5em; }}
code {{ font-size: 90%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(ordered)} checkpoints, {len(ordered) - n_err} measured, {n_err} with errors.</p>
<p>Configuration: <code>{html.escape(str(config))}</code></p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Metrics against training progress</h2>
{chr(10).join(figures)}
</body></html>
"""


def write_html(path: str | os.PathLike, rows: Sequence[dict[str, Any]], metrics: Sequence[str], title: str = "sharpkit audit") -> Path:
    """Write :func:`render_html` atomically (temporary file, fsync, rename)."""
    return atomic_write_text(path, render_html(rows, metrics, title))
