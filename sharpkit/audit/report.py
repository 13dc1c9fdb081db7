"""The audit report: a table in training order, and each metric plotted against the checkpoints'
step or epoch, in a self-contained HTML file (figures embedded as base64 PNG)."""
from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_write_text

__all__ = ["progress_axis", "sort_rows", "format_table", "render_html", "write_html"]


def progress_axis(rows: Sequence[dict[str, Any]]) -> str | None:
    """What orders the rows and is plotted on x: ``"step"`` when every row with a number has a
    step, else whichever of ``"epoch"`` and ``"step"`` more rows have (``"epoch"`` on a tie);
    ``None`` when no row has either.  Mixing them would misplace rows: epoch 2 is not step 2."""
    with_step = sum(r.get("step") is not None for r in rows)
    with_epoch = sum(r.get("epoch") is not None for r in rows)
    numbered = sum(r.get("step") is not None or r.get("epoch") is not None for r in rows)
    if numbered == 0:
        return None
    if with_step == numbered:
        return "step"
    return "epoch" if with_epoch >= with_step else "step"


def sort_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in training order: by :func:`progress_axis` (the other number breaks ties), then by
    name; rows without that number last, by name.  Without any numbers: by name."""
    axis = progress_axis(rows)
    other = "epoch" if axis == "step" else "step"

    def key(row: dict[str, Any]) -> tuple:
        v, w = (row.get(axis), row.get(other)) if axis else (None, None)
        return (v is None, v or 0, w is None, w or 0, row.get("name") or "")

    return sorted(rows, key=key)


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
    """A plain-text table of the sorted rows; each error row's reason follows the table, after the
    row's name."""
    cols = _columns(metrics)
    body = [[_fmt(r.get(c)) for c in cols] for r in sort_rows(rows)]
    widths = [max(len(c), *(len(line[i]) for line in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in body]
    errors = [r for r in sort_rows(rows) if r.get("status") == "error"]
    if errors:
        lines.append("")
        lines += [f"error: {r.get('name')}: {_reason(r)}" for r in errors]
    return "\n".join(lines)


def _reason(row: dict[str, Any]) -> str:
    """A row's error without the leading ``<checkpoint path>: `` that most messages start with:
    the table's line names the row already."""
    error, path = str(row.get("error")), row.get("checkpoint")
    return error[len(path) + 2:] if path and error.startswith(f"{path}: ") else error


def _series(rows: list[dict[str, Any]]) -> list[tuple[str | None, list[dict[str, Any]]]]:
    """``rows`` split into runs by the folder part of their names (``sb/``, ``lb/``) when several
    runs have more than one checkpoint, so that each run is its own line instead of one line
    zigzagging between runs; else one series."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault(os.path.dirname(r.get("name") or ""), []).append(r)
    if len(runs) > 1 and any(len(members) > 1 for members in runs.values()):
        return list(runs.items())
    return [(None, rows)]


def _plot(rows: list[dict[str, Any]], metric: str, axis: str | None) -> str:
    """One metric against ``axis`` (``"step"``/``"epoch"``; every row has it), or against the
    rows' order when ``axis`` is None, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    label = axis or "checkpoint (sorted by name)"
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    order = {id(r): i for i, r in enumerate(rows)}
    try:
        series = _series(rows)
        for run, members in series:
            xs = [r[axis] if axis else order[id(r)] for r in members]
            ax.plot(xs, [r.get(metric) for r in members], marker="o", lw=1.5, label=run)
        if len(series) > 1:
            ax.legend(fontsize="small")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {axis or 'checkpoint'}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def definitions(metrics: Sequence[str], config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(column, what it measures, in which units, with which settings)`` for the loss and each
    metric, the settings read from a row's ``config`` (absent ones left out)."""
    def opt(name: str, fmt: str = "{}") -> str:
        return fmt.format(config[name]) if name in config else ""

    def steps(name: str) -> str:
        n = config.get(name)
        return "" if n is None else f"{n} step{'' if n == 1 else 's'} of "

    solver = f"; {steps('max_iter')}{opt('solver')}" if "solver" in config else ""
    adaptive_solver = f"; {steps('adaptive_max_iter')}{opt('solver')}" if "solver" in config else ""
    c = "|x_i|" if config.get("adaptive_scale", True) else "1"
    ball = (f"‖δ ⊘ c‖₂ ≤ ρ with c_i = {c}" if config.get("adaptive_norm") == "l2"
            else f"|δ_i| ≤ ρ c_i with c_i = {c}")
    text = {
        "loss": "mean training loss f(x) at the checkpoint, over the audit's data",
        "keskar": ("ε-sharpness of Keskar et al. (2017, Eq. 4) in the full space, in percent: "
                   "100 (max f(x + y) − f(x)) / (1 + f(x)) over the box |y_i| ≤ ε (|x_i| + 1)"
                   f"{opt('epsilon', ', ε = {}')}{solver}"),
        "keskar-subspace": ("the same in a random subspace, in percent: y = A z with A an n × p Gaussian "
                            "matrix and the box |z_i| ≤ ε (|(A⁺x)_i| + 1)"
                            f"{opt('epsilon', ', ε = {}')}{opt('subspace_dim', ', p = {}')}{solver}"),
        "adaptive": ("worst-case adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023), in loss "
                     f"units: max f(x + δ) − f(x) over {ball}{opt('rho', ', ρ = {}')}{adaptive_solver}"),
        "top-eig": ("largest eigenvalue of the training loss's Hessian, by Lanczos"
                    f"{opt('lanczos_steps', ' ({} steps)')}; the k{opt('k', ' = {}')} largest are in the results "
                    "file's details"),
        "trace": ("trace of the training loss's Hessian by Hutchinson's estimator"
                  f"{opt('trace_samples', ' ({} Rademacher probes)')}; its standard error is in the results "
                  "file's details"),
    }
    return [(m, text[m]) for m in ("loss", *metrics) if m in text]


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
    # Measured rows are plotted against the table's axis; those without it are listed instead.
    axis = progress_axis(ordered)
    ok = [r for r in ordered if r.get("status") == "ok"]
    plotted = [r for r in ok if axis is None or r.get(axis) is not None]
    figures = []
    for m in ("loss", *metrics):
        if plotted:
            figures.append(f'<figure><img alt="{html.escape(m)}" src="data:image/png;base64,{_plot(plotted, m, axis)}"></figure>')
    left_out = [html.escape(r.get("name") or "") for r in ok if axis is not None and r.get(axis) is None]
    if left_out:
        figures.append(f"<p>Not plotted (no {axis} in their paths): {', '.join(left_out)}.</p>")
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
<dl>
{chr(10).join(f"<dt>{html.escape(m)}</dt><dd>{html.escape(t)}</dd>" for m, t in definitions(metrics, config))}
</dl>
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
