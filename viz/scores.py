"""Evaluation results as a table and a grouped bar chart (the studio's Evaluate tab).

Takes ``(label, EvalReport.summary())`` pairs, so it needs no model and no evaluation code; a
model keeps the colour it has in the redundancy figures (``viz.figures.model_colors``).
"""

from __future__ import annotations

import plotly.graph_objects as go

from viz.figures import NEUTRAL, PALETTE, TEMPLATE, model_colors

# (model label, {"tasks": {task: accuracy}, "perplexity": float | None[, "general": {task: accuracy}]})
Reports = list[tuple[str, dict]]
GENERAL = "general (kept)"  # the column and bar of the general suite's mean: out-of-distribution ability


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


def general_score(report: dict) -> float | None:
    """Mean accuracy on the general suite's tasks (what the model kept of the base's general
    ability), None when it was not measured."""
    general = report.get("general") or {}
    return sum(general.values()) / len(general) if general else None


def score_rows(reports: Reports) -> list[dict]:
    """One row per model: accuracy per task in %, their mean (in-domain), the general suite's mean
    (out of distribution) and the perplexity, when measured."""
    tasks = _tasks(reports)
    mean = "in-domain mean" if any(general_score(report) is not None for _, report in reports) else "mean accuracy"
    rows = []
    for label, report in reports:
        row = {"model": label, **{t: round(100 * report["tasks"][t], 1) for t in tasks if t in report["tasks"]}}
        if tasks:
            row[mean] = round(100 * sum(report["tasks"].values()) / len(report["tasks"]), 1)
        if general_score(report) is not None:
            row[GENERAL] = round(100 * general_score(report), 1)
        if report["perplexity"] is not None:
            row["perplexity"] = round(report["perplexity"], 3)
        rows.append(row)
    return rows


def score_chart(reports: Reports, colors: dict[str, str] | None = None) -> go.Figure:
    """Accuracy per task, a bar per model (perplexity per model when no task was measured);
    ``colors``: label -> bar colour (default: the palette in order)."""
    colors = colors or model_colors([label for label, _ in reports])
    tasks = _tasks(reports)
    general = any(general_score(report) is not None for _, report in reports)
    figure = go.Figure()
    if tasks:
        for label, report in reports:
            values = [100 * report["tasks"].get(t, 0) for t in tasks]
            if general:  # one more group, after a gap: the same model on what the base already knew
                values.append(None if general_score(report) is None else 100 * general_score(report))
            figure.add_bar(name=label, x=[*tasks, *([GENERAL] if general else [])], y=values,
                           marker_color=colors.get(label), hovertemplate="%{x}: %{y:.1f}%<extra>" + label + "</extra>")
        figure.update_layout(barmode="group", yaxis={"title": "accuracy (%)", "range": [0, 100]},
                             title="Task accuracy" + (": in-domain tasks, and general ability kept" if general else ""))
        if general:
            figure.add_vline(x=len(tasks) - 0.5, line={"color": NEUTRAL, "dash": "dot"})
    else:
        figure.add_bar(x=[label for label, _ in reports], y=[r["perplexity"] for _, r in reports],
                       marker_color=[colors.get(label) for label, _ in reports])
        figure.update_layout(yaxis={"title": "perplexity (lower is better)"}, title="Perplexity")
    figure.update_layout(template=TEMPLATE)
    return figure
