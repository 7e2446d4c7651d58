"""Evaluation results as a table and a grouped bar chart (the studio's Evaluate tab).

Takes ``(label, EvalReport.summary())`` pairs, so it needs no model and no evaluation code; a
model keeps the colour it has in the redundancy figures (``viz.figures.model_colors``).
"""

from __future__ import annotations

import plotly.graph_objects as go

from viz.figures import NEUTRAL, PALETTE, TEMPLATE, model_colors

Reports = list[tuple[str, dict]]  # (model label, {"tasks": {task: accuracy}, "perplexity": float | None})


def score_colors(labels: list[str], sources: list[str], base: str | None = None) -> dict[str, str]:
    """A colour per model label: the sources keep the redundancy figures' (``model_colors`` of
    ``sources``), the base is neutral grey, and any other model (a merge) takes the next colours."""
    colors = model_colors(sources)
    others = [label for label in labels if label not in colors and label != base]
    colors.update({label: PALETTE[(len(sources) + i) % len(PALETTE)] for i, label in enumerate(others)})
    if base is not None:
        colors[base] = NEUTRAL
    return colors


def _tasks(reports: Reports) -> list[str]:
    """Every task, in the suite's order."""
    return list(dict.fromkeys(t for _, r in reports for t in r["tasks"]))


def score_rows(reports: Reports) -> list[dict]:
    """One row per model: accuracy per task in %, their mean, and the perplexity when measured."""
    tasks = _tasks(reports)
    rows = []
    for label, report in reports:
        row = {"model": label, **{t: round(100 * report["tasks"][t], 1) for t in tasks if t in report["tasks"]}}
        if tasks:
            row["mean accuracy"] = round(100 * sum(report["tasks"].values()) / len(report["tasks"]), 1)
        if report["perplexity"] is not None:
            row["perplexity"] = round(report["perplexity"], 3)
        rows.append(row)
    return rows


def score_chart(reports: Reports, colors: dict[str, str] | None = None) -> go.Figure:
    """Accuracy per task, a bar per model (perplexity per model when no task was measured);
    ``colors``: label -> bar colour (default: the palette in order)."""
    colors = colors or model_colors([label for label, _ in reports])
    tasks = _tasks(reports)
    figure = go.Figure()
    if tasks:
        for label, report in reports:
            figure.add_bar(name=label, x=tasks, y=[100 * report["tasks"].get(t, 0) for t in tasks],
                           marker_color=colors.get(label), hovertemplate="%{x}: %{y:.1f}%<extra>" + label + "</extra>")
        figure.update_layout(barmode="group", yaxis={"title": "accuracy (%, exact match)", "range": [0, 100]},
                             title="Task accuracy")
    else:
        figure.add_bar(x=[label for label, _ in reports], y=[r["perplexity"] for _, r in reports],
                       marker_color=[colors.get(label) for label, _ in reports])
        figure.update_layout(yaxis={"title": "perplexity (lower is better)"}, title="Perplexity")
    figure.update_layout(template=TEMPLATE)
    return figure
