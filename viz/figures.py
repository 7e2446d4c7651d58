"""Plotly figures of the redundancy statistics and the DARE sweep.

Every figure takes the plain result objects (``RedundancyStats``, ``SweepResult``) and returns
a ``plotly.graph_objects.Figure`` with a title, labelled axes with units, and hover text that
names the model, layer and tensor a point stands for. All share ``TEMPLATE``, and a model has
the same colour in every figure (``model_colors``: the Okabe-Ito palette, safe for colour
blindness, in the order the models were given).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merging.units import format_count
from viz.measures import TOP_FRACTIONS
from viz.spectral import SV_FRACTIONS
from viz.stats import GroupStats, RedundancyStats
from viz.sweep import METHOD_TITLES, SweepResult

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
NEUTRAL = "#7f7f7f"
BEFORE, AFTER = "#444444", "#D55E00"  # sign conflicts before / after trimming (not per model)

TEMPLATE = go.layout.Template(
    layout=go.Layout(
        font=dict(family="Inter, Helvetica, Arial, sans-serif", size=13, color="#222"),
        title=dict(x=0.0, xanchor="left", font=dict(size=17)),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=list(PALETTE),
        hovermode="closest",
        hoverlabel=dict(font=dict(size=12)),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0.0),
        margin=dict(l=70, r=30, t=90, b=60),
        xaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#999", ticks="outside"),
        yaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#999", ticks="outside"),
    )
)


def model_colors(labels: list[str]) -> dict[str, str]:
    """The colour of each model, by position (the same in every figure of one report)."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _figure(title: str, x_title: str, y_title: str, **layout) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(template=TEMPLATE, title_text=title, xaxis_title=x_title, yaxis_title=y_title, **layout)
    return figure


def _note(figure: go.Figure, text: str) -> go.Figure:
    """A centred message in place of data (e.g. sign conflicts with one model)."""
    figure.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14, color=NEUTRAL))
    return figure


def _axis_label(group: GroupStats) -> str:
    """Short x-axis category of a group: the layer number, or a short name."""
    if group.layer is not None:
        return str(group.layer)
    return {"embeddings": "embed", "final norm": "norm"}.get(group.name, group.name)


def _translucent(color: str, alpha: float) -> str:
    red, green, blue = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red}, {green}, {blue}, {alpha})"


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _layer_axis(figure: go.Figure, stats: RedundancyStats) -> None:
    categories = [_axis_label(g) for g in stats.layers]
    figure.update_xaxes(type="category", categoryorder="array", categoryarray=categories)


# -- 1. delta magnitudes -----------------------------------------------------------------------

def magnitude_distribution(stats: RedundancyStats) -> go.Figure:
    """Histogram of |δ| per model on a log axis: % of all entries per log-spaced bin.

    Entries with δ exactly 0 (tensors or entries fine-tuning did not touch) are not on a log
    axis; their share is in the legend.
    """
    figure = _figure(
        "Delta magnitudes |δ| = |θ_fine-tuned − θ_base|, per model",
        "|δ| (change of a weight, in weight units; log scale)",
        "entries in bin (% of all entries)",
    )
    hist = stats.histogram
    colors = model_colors(stats.labels)
    if not hist.edges:
        return _note(figure, "no weight differs from the base: every task vector is 0")
    centers = [math.sqrt(a * b) for a, b in zip(hist.edges[:-1], hist.edges[1:])]
    ranges = [[a, b] for a, b in zip(hist.edges[:-1], hist.edges[1:])]
    for label in stats.labels:
        zero = hist.zero_fraction[label]
        figure.add_trace(go.Scatter(
            x=centers, y=[100 * f for f in hist.fractions[label]], mode="lines", line_shape="spline",
            line=dict(color=colors[label], width=2), name=f"{label} ({zero:.0%} of entries exactly 0)",
            customdata=ranges, fill="tozeroy", fillcolor=_translucent(colors[label], 0.12),
            hovertemplate=(f"<b>{label}</b><br>|δ| in [%{{customdata[0]:.3g}}, %{{customdata[1]:.3g}})"
                           "<br>%{y:.2f}% of all entries<extra></extra>"),
        ))
    figure.update_xaxes(type="log", exponentformat="power")
    return figure


# -- 2. relative delta norm per layer ----------------------------------------------------------

def relative_norm_by_layer(stats: RedundancyStats) -> go.Figure:
    """‖δ‖/‖θ_base‖ (%) per layer group, a line per model, with each tensor as a faint dot."""
    figure = _figure(
        "How far fine-tuning moved each layer: ‖δ‖₂ / ‖θ_base‖₂",
        "layer (embed = embeddings, norm = final norm)",
        "relative task-vector norm (%)",
    )
    colors = model_colors(stats.labels)
    x = [_axis_label(g) for g in stats.layers]
    for label in stats.labels:
        figure.add_trace(go.Scatter(
            x=x, y=[_percent(g.deltas[label].relative_norm) for g in stats.layers], mode="lines+markers",
            name=label, legendgroup=label, line=dict(color=colors[label], width=2),
            customdata=[[g.name, g.deltas[label].norm, format_count(g.numel)] for g in stats.layers],
            hovertemplate=(f"<b>{label}</b> · %{{customdata[0]}}<br>‖δ‖/‖θ_base‖ = %{{y:.4g}}%"
                           "<br>‖δ‖ = %{customdata[1]:.4g} over %{customdata[2]} entries<extra></extra>"),
        ))
        by_group = {g.name: _axis_label(g) for g in stats.layers}
        figure.add_trace(go.Scatter(
            x=[by_group[t.group] for t in stats.tensors], y=[_percent(t.deltas[label].relative_norm) for t in stats.tensors],
            mode="markers", name=f"{label}: tensors", legendgroup=label, showlegend=False,
            marker=dict(color=colors[label], size=5, opacity=0.35),
            customdata=[[t.name, t.group, "×".join(map(str, t.shape or []))] for t in stats.tensors],
            hovertemplate=(f"<b>{label}</b> · %{{customdata[1]}}<br>tensor %{{customdata[0]}} (%{{customdata[2]}})"
                           "<br>‖δ‖/‖θ_base‖ = %{y:.4g}%<extra></extra>"),
        ))
    _layer_axis(figure, stats)
    return figure


# -- 3. energy concentration -------------------------------------------------------------------

def energy_concentration(stats: RedundancyStats) -> go.Figure:
    """Share of ‖δ‖² held by the top k% of |δ| of each tensor: a bold line per model (whole
    model) and a faint one per layer; the diagonal is a delta with all entries equal."""
    figure = _figure(
        "How concentrated each task vector is: share of ‖δ‖² in its largest k% of entries",
        "top k% of entries by |δ|, per tensor (log scale)",
        "share of the task vector's energy ‖δ‖² (%)",
    )
    colors = model_colors(stats.labels)
    ks = [100 * f for f in TOP_FRACTIONS] + [100.0]
    figure.add_trace(go.Scatter(
        x=ks, y=ks, mode="lines", name="every entry equal (no concentration)",
        line=dict(color=NEUTRAL, dash="dot"), hovertemplate="top %{x:g}% of entries hold %{y:g}%<extra>uniform</extra>",
    ))

    def curve(group: GroupStats, label: str) -> list[float | None]:
        shares = group.deltas[label].energy_top
        return [_percent(shares[f"{f:g}"]) for f in TOP_FRACTIONS] + [100.0 if shares[f"{TOP_FRACTIONS[0]:g}"] is not None else None]

    for label in stats.labels:
        for group in stats.layers:
            if group.deltas[label].energy_top[f"{TOP_FRACTIONS[0]:g}"] is None:
                continue  # this layer did not change: no curve
            figure.add_trace(go.Scatter(
                x=ks, y=curve(group, label), mode="lines", legendgroup=label, showlegend=False,
                name=f"{label}: {group.name}", line=dict(color=colors[label], width=1), opacity=0.25,
                hovertemplate=f"<b>{label}</b> · {group.name}<br>top %{{x:g}}% of entries hold %{{y:.1f}}% of ‖δ‖²<extra></extra>",
            ))
        figure.add_trace(go.Scatter(
            x=ks, y=curve(stats.model, label), mode="lines+markers", name=label, legendgroup=label,
            line=dict(color=colors[label], width=3),
            hovertemplate=f"<b>{label}</b> · whole model<br>top %{{x:g}}% of entries hold %{{y:.1f}}% of ‖δ‖²<extra></extra>",
        ))
    figure.update_xaxes(type="log", tickvals=ks, ticktext=[f"{k:g}%" for k in ks])
    figure.update_yaxes(range=[0, 101])
    return figure


# -- 4. sign conflicts -------------------------------------------------------------------------

def sign_conflicts_by_layer(stats: RedundancyStats) -> go.Figure:
    """Per layer: % of entries (where ≥ 2 models change) whose non-zero deltas disagree in
    sign, before and after trimming each task vector to its top-``density`` per tensor."""
    figure = _figure(
        f"Sign conflicts per layer, before and after TIES trimming (density {stats.density:g})",
        "layer (embed = embeddings, norm = final norm)",
        "conflicting entries (% of those ≥2 models change)",
    )
    if len(stats.labels) < 2:
        return _note(figure, "sign conflicts need two or more fine-tuned models")
    x = [_axis_label(g) for g in stats.layers]
    by_group = {g.name: _axis_label(g) for g in stats.layers}
    series = (
        ("before trimming", BEFORE, "solid", "rate", "eligible", "conflicts"),
        (f"after trimming to density {stats.density:g}", AFTER, "dash", "trimmed_rate", "trimmed_eligible", "trimmed_conflicts"),
    )
    for name, color, dash, rate, eligible, conflicts in series:
        figure.add_trace(go.Scatter(
            x=x, y=[_percent(getattr(g.conflicts, rate)) for g in stats.layers], mode="lines+markers", name=name,
            legendgroup=name, line=dict(color=color, dash=dash, width=2),
            customdata=[[g.name, format_count(getattr(g.conflicts, conflicts)), format_count(getattr(g.conflicts, eligible)),
                         _percent(getattr(g.conflicts, conflicts) / max(1, g.numel))] for g in stats.layers],
            hovertemplate=(f"<b>{name}</b> · %{{customdata[0]}}<br>%{{y:.1f}}% conflicting: %{{customdata[1]}} of "
                           "%{customdata[2]} entries where ≥2 models change<br>(%{customdata[3]:.2f}% of all entries)<extra></extra>"),
        ))
        tensors = [t for t in stats.tensors if t.conflicts is not None and getattr(t.conflicts, rate) is not None]
        figure.add_trace(go.Scatter(
            x=[by_group[t.group] for t in tensors], y=[_percent(getattr(t.conflicts, rate)) for t in tensors],
            mode="markers", name=f"{name}: tensors", legendgroup=name, showlegend=False,
            marker=dict(color=color, size=5, opacity=0.3),
            customdata=[[t.name, t.group] for t in tensors],
            hovertemplate=f"<b>{name}</b> · %{{customdata[1]}}<br>tensor %{{customdata[0]}}<br>%{{y:.1f}}% conflicting<extra></extra>",
        ))
    _layer_axis(figure, stats)
    figure.update_yaxes(rangemode="tozero")
    return figure


# -- 5. task-vector similarity -----------------------------------------------------------------

def task_vector_similarity(stats: RedundancyStats) -> go.Figure:
    """Cosine similarity of task vectors: the whole-model matrix, and each pair per layer."""
    labels = stats.labels
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    figure = make_subplots(
        rows=1, cols=2, column_widths=[0.3, 0.7], horizontal_spacing=0.22,
        subplot_titles=("whole model", "per layer, for each pair of models"),
    )
    figure.update_layout(template=TEMPLATE, title_text="Task-vector similarity: cos(δa, δb) = ⟨δa, δb⟩ / (‖δa‖‖δb‖)",
                         margin=dict(l=110))
    scale = dict(colorscale="RdBu", zmin=-1, zmax=1, zmid=0)
    matrix = [[stats.model.cosine[a].get(b) for b in labels] for a in labels]
    figure.add_trace(go.Heatmap(
        z=matrix, x=labels, y=labels, **scale, name="whole model", showscale=False,
        text=[["" if v is None else f"{v:.2f}" for v in row] for row in matrix], texttemplate="%{text}",
        hovertemplate="whole model<br>cos(δ %{y}, δ %{x}) = %{z:.3f}<extra></extra>",
    ), row=1, col=1)
    if pairs:
        x = [_axis_label(g) for g in stats.layers]
        figure.add_trace(go.Heatmap(
            z=[[g.cosine[a].get(b) for g in stats.layers] for a, b in pairs], x=x, y=[f"{a} · {b}" for a, b in pairs],
            **scale, name="per layer", colorbar=dict(title=dict(text="cosine"), len=0.9),
            customdata=[[g.name for g in stats.layers] for _ in pairs],
            hovertemplate="%{customdata}<br>%{y}: cos = %{z:.3f}<extra></extra>",
        ), row=1, col=2)
        figure.update_xaxes(type="category", categoryorder="array", categoryarray=x,
                            title_text="layer (embed = embeddings, norm = final norm)", row=1, col=2)
        figure.update_yaxes(autorange="reversed", row=1, col=2)
    else:
        figure.add_annotation(text="one model: no pair to compare", x=0.75, y=0.5, xref="paper", yref="paper",
                              showarrow=False, font=dict(size=14, color=NEUTRAL))
    figure.update_xaxes(title_text="model", row=1, col=1)
    figure.update_yaxes(title_text="model", autorange="reversed", row=1, col=1)
    return figure


# -- 6. singular-value spectra -------------------------------------------------------------------

SUM_LABEL = "Σδᵢ (sum of the task matrices)"


def _spectral_groups(stats: RedundancyStats) -> list[GroupStats]:
    """The whole model, then every layer group holding weight matrices."""
    return [stats.model, *[g for g in stats.layers if g.spectral is not None and g.spectral.matrices]]


def _spectral_series(stats: RedundancyStats) -> list[tuple[str, str, str, object]]:
    """(name, colour, dash, spectrum of a SpectralStats) of each line: the models, Σδᵢ, the merge."""
    colors = model_colors(stats.labels)
    series = [(label, colors[label], "solid", lambda sp, label=label: sp.spectra.get(label)) for label in stats.labels]
    if stats.model.spectral.sum_spectrum is not None:
        series.append((SUM_LABEL, BEFORE, "dash", lambda sp: sp.sum_spectrum))
    if stats.model.spectral.merged_spectrum is not None:
        series.append((f"merged: {stats.merged_label}", AFTER, "dashdot", lambda sp: sp.merged_spectrum))
    return series


def _no_spectra(figure: go.Figure) -> go.Figure:
    return _note(figure, "singular values were not computed (python -m viz report without --no-spectra)")


def singular_value_spectra(stats: RedundancyStats) -> go.Figure:
    """σ against its index (log-log) for each δᵢ, Σδᵢ and the merged update, pooled over the weight
    matrices of the whole model or, chosen with the slider, of one layer."""
    figure = _figure(
        "Singular-value spectra of the task matrices δᵢ, their sum Σδᵢ and the merged update",
        "singular value index, largest first (all weight matrices of the group pooled; log scale)",
        "singular value σ (weight units; log scale)",
    )
    if stats.model.spectral is None:
        return _no_spectra(figure)
    series = _spectral_series(stats)
    groups = _spectral_groups(stats)

    def trace_data(name: str, spectrum, group: GroupStats) -> dict:
        if spectrum is None or not spectrum.values:
            return dict(x=[], y=[], hovertemplate="")
        rank = (f"numerical rank {spectrum.numerical_rank:,} of {spectrum.rank:,}" if spectrum.numerical_rank is not None
                else f"top {spectrum.known:,} of {spectrum.rank:,} values, approximate (randomized SVD)")
        where = "whole model" if group.name == "model" else group.name
        return dict(x=spectrum.index, y=spectrum.values,
                    hovertemplate=f"<b>{name}</b> · {where}<br>σ<sub>%{{x}}</sub> = %{{y:.3g}}<br>{rank}<extra></extra>")

    for name, color, dash, pick in series:
        figure.add_trace(go.Scatter(mode="lines+markers", name=name, line=dict(color=color, dash=dash, width=2),
                                    marker=dict(size=4), **trace_data(name, pick(stats.model.spectral), stats.model)))
    steps = []
    for group in groups:
        data = [trace_data(name, pick(group.spectral), group) for name, _, _, pick in series]
        steps.append(dict(label="whole model" if group.name == "model" else _axis_label(group), method="restyle",
                          args=[{key: [d[key] for d in data] for key in ("x", "y", "hovertemplate")}]))
    # a slider, not a dropdown: a menu of 30 layers would hang far below the plot
    figure.update_layout(sliders=[dict(steps=steps, active=0, pad=dict(t=70), len=1.0, x=0.0,
                                       currentvalue=dict(prefix="showing: ", font=dict(size=13)))],
                         height=560)
    figure.update_xaxes(type="log", exponentformat="power")
    figure.update_yaxes(type="log", exponentformat="power")
    return figure


# -- 7. effective rank ----------------------------------------------------------------------------

def spectral_energy(stats: RedundancyStats) -> go.Figure:
    """Share of ‖δ‖²_F held by the top k% of each weight matrix's singular values: a bold line per
    model (whole model), a faint one per layer, Σδᵢ and the merged update dashed; the diagonal is a
    flat spectrum."""
    figure = _figure(
        "How low-rank each task vector is: share of ‖δ‖²_F in its largest k% of singular values",
        "top k% of the singular values of each weight matrix (log scale)",
        "share of the task matrices' energy ‖δ‖²_F (%)",
    )
    if stats.model.spectral is None:
        return _no_spectra(figure)
    fractions = list(SV_FRACTIONS)
    ks = [100 * f for f in fractions] + [100.0]
    figure.add_trace(go.Scatter(
        x=ks, y=ks, mode="lines", name="flat spectrum (every singular value equal)",
        line=dict(color=NEUTRAL, dash="dot"), hovertemplate="top %{x:g}% of singular values hold %{y:g}%<extra>flat</extra>",
    ))

    def curve(shares: dict[str, float | None] | None) -> list[float | None] | None:
        if shares is None or shares[f"{fractions[0]:g}"] is None:
            return None
        return [_percent(shares[f"{f:g}"]) for f in fractions] + [100.0]

    colors = model_colors(stats.labels)
    for label in stats.labels:
        for group in _spectral_groups(stats)[1:]:
            y = curve(group.spectral.energy_top.get(label))
            if y is None:
                continue  # this layer's matrices did not change
            figure.add_trace(go.Scatter(
                x=ks, y=y, mode="lines", legendgroup=label, showlegend=False, name=f"{label}: {group.name}",
                line=dict(color=colors[label], width=1), opacity=0.25,
                hovertemplate=f"<b>{label}</b> · {group.name}<br>top %{{x:g}}% of singular values hold %{{y:.1f}}% of ‖δ‖²<extra></extra>",
            ))
        figure.add_trace(go.Scatter(
            x=ks, y=curve(stats.model.spectral.energy_top.get(label)), mode="lines+markers", name=label, legendgroup=label,
            line=dict(color=colors[label], width=3),
            hovertemplate=f"<b>{label}</b> · whole model<br>top %{{x:g}}% of singular values hold %{{y:.1f}}% of ‖δ‖²<extra></extra>",
        ))
    extra = [(SUM_LABEL, BEFORE, stats.model.spectral.sum_energy_top),
             (f"merged: {stats.merged_label}", AFTER, stats.model.spectral.merged_energy_top)]
    for name, color, shares in extra:
        if curve(shares) is not None:
            figure.add_trace(go.Scatter(
                x=ks, y=curve(shares), mode="lines+markers", name=name, line=dict(color=color, dash="dash", width=2.5),
                hovertemplate=f"<b>{name}</b> · whole model<br>top %{{x:g}}% of singular values hold %{{y:.1f}}% of ‖δ‖²<extra></extra>",
            ))
    figure.update_xaxes(type="log", tickvals=ks, ticktext=[f"{k:g}%" for k in ks])
    figure.update_yaxes(range=[0, 101])
    return figure


# -- 8. subspace overlap --------------------------------------------------------------------------

def _pairs(labels: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]


def _mean_over_pairs(overlaps: dict[str, dict[str, float | None]] | None, pairs) -> float | None:
    values = [overlaps[a][b] for a, b in pairs if overlaps is not None and overlaps[a][b] is not None]
    return sum(values) / len(values) if values else None


def subspace_overlap(stats: RedundancyStats) -> go.Figure:
    """Per layer, the overlap ‖UᵢᵀUⱼ‖²_F / k of the tasks' top-k singular subspaces (left: output
    space; right: input space), the mean over pairs (each pair a faint dot), before merging and in
    the merged update, against what random subspaces give; with a merge, a third panel: each task's
    subspace alignment ratio with the merged update."""
    merged = stats.model.spectral is not None and stats.model.spectral.merged_alignment is not None
    titles = ["left singular vectors U (the matrix's outputs)", "right singular vectors V (the matrix's inputs)"]
    if merged:
        titles.append("each task's alignment with the merge")
    figure = make_subplots(rows=1, cols=len(titles), shared_yaxes=True, horizontal_spacing=0.05, subplot_titles=titles)
    figure.update_layout(template=TEMPLATE, title_text="Subspace interference: overlap of the tasks' top-k singular "
                                                        "subspaces, ‖UᵢᵀUⱼ‖²_F / k",
                         legend=dict(y=1.16), margin=dict(t=140))
    figure.update_annotations(yshift=4)  # the subplot titles, clear of the legend above them
    figure.update_xaxes(title_text="layer (embed = embeddings)")
    figure.update_yaxes(title_text="overlap (0 orthogonal … 1 the same)", row=1, col=1)
    if stats.model.spectral is None:
        return _no_spectra(figure)
    if len(stats.labels) < 2:
        return _note(figure, "subspace overlap needs two or more fine-tuned models")
    groups = [g for g in _spectral_groups(stats)[1:] if g.spectral.chance_left is not None]
    x = [_axis_label(g) for g in groups]
    pairs = _pairs(stats.labels)
    after = f"in the merged update ({stats.merged_label})"
    for col, side in ((1, "left"), (2, "right")):
        lines = [("before merging (the task matrices)", BEFORE, "solid", f"overlap_{side}")]
        if merged:
            lines.append((after, AFTER, "dash", f"merged_overlap_{side}"))
        for name, color, dash, key in lines:
            figure.add_trace(go.Scatter(
                x=x, y=[_mean_over_pairs(getattr(g.spectral, key), pairs) for g in groups], mode="lines+markers",
                name=name, legendgroup=name, showlegend=col == 1, line=dict(color=color, dash=dash, width=2),
                customdata=[[g.name] for g in groups],
                hovertemplate=f"<b>{name}</b> · %{{customdata[0]}} · {side} vectors<br>mean over pairs %{{y:.3f}}<extra></extra>",
            ), row=1, col=col)
            dots = [(g, a, b, getattr(g.spectral, key)[a][b]) for g in groups for a, b in pairs
                    if getattr(g.spectral, key) is not None and getattr(g.spectral, key)[a][b] is not None]
            figure.add_trace(go.Scatter(
                x=[_axis_label(g) for g, *_ in dots], y=[v for *_, v in dots], mode="markers", name=f"{name}: pairs",
                legendgroup=name, showlegend=False, marker=dict(color=color, size=5, opacity=0.35),
                customdata=[[g.name, f"{a} · {b}"] for g, a, b, _ in dots],
                hovertemplate=f"<b>%{{customdata[1]}}</b> · %{{customdata[0]}} · {side} vectors<br>{name}: %{{y:.3f}}<extra></extra>",
            ), row=1, col=col)
        chance = "random subspaces of the same size (k/m)"
        figure.add_trace(go.Scatter(
            x=x, y=[getattr(g.spectral, f"chance_{side}") for g in groups], mode="lines", name=chance, legendgroup=chance,
            showlegend=col == 1, line=dict(color=NEUTRAL, dash="dot"), customdata=[[g.name] for g in groups],
            hovertemplate=f"%{{customdata[0]}}: random {side} subspaces overlap %{{y:.3f}} on average<extra></extra>",
        ), row=1, col=col)
    if merged:
        colors = model_colors(stats.labels)
        for label in stats.labels:
            figure.add_trace(go.Scatter(
                x=x, y=[g.spectral.merged_alignment.get(label) for g in groups], mode="lines+markers",
                name=f"{label}: alignment", legendgroup=f"{label}: alignment", line=dict(color=colors[label], width=2),
                customdata=[[g.name] for g in groups],
                hovertemplate=(f"<b>{label}</b> · %{{customdata[0]}}<br>‖Πδ‖/‖δ‖ = %{{y:.3f}}: its share in the merged "
                               "update's top directions<extra></extra>"),
            ), row=1, col=3)
    for col in range(1, len(titles) + 1):
        figure.update_xaxes(type="category", categoryorder="array", categoryarray=x, row=1, col=col)
    figure.update_yaxes(range=[0, 1.02])
    return figure


# -- 9. the DARE sweep -------------------------------------------------------------------------

def sweep_chart(sweep: SweepResult, color: str | None = None) -> go.Figure:
    """Performance against drop rate: random drop with rescale (DARE) against magnitude trim.

    Accuracy (mean over the swept tasks) on top, perplexity below when a text was given; the
    base model is a dotted line. The x axis is categorical (0 … 99%), as in the DARE paper.
    """
    color = color or PALETTE[0]
    has_accuracy = sweep.accuracy(sweep.base_point) is not None
    has_perplexity = sweep.base_point.perplexity is not None
    rows = [name for name, present in (("accuracy", has_accuracy), ("perplexity", has_perplexity)) if present]
    figure = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.1)
    tasks = ", ".join(sweep.tasks) if sweep.tasks else "—"
    figure.update_layout(template=TEMPLATE, title_text=f"DARE sweep of {sweep.model}: performance against drop rate",
                         height=420 + 220 * (len(rows) - 1))
    dashes = {"random": "solid", "magnitude": "dash"}
    symbols = {"random": "circle", "magnitude": "square"}
    categories = None
    for method in [m for m in METHOD_TITLES if sweep.series(m)]:
        points = sweep.series(method)
        x = [f"{p.drop_rate:.0%}" for p in points]
        categories = categories or x
        for row, metric in enumerate(rows, 1):
            y = [_percent(sweep.accuracy(p)) if metric == "accuracy" else p.perplexity for p in points]
            kept = [sweep.retained(p) for p in points]
            figure.add_trace(go.Scatter(
                x=x, y=y, mode="lines+markers", name=METHOD_TITLES[method], legendgroup=method, showlegend=row == 1,
                line=dict(color=color, dash=dashes[method], width=2.5), marker=dict(symbol=symbols[method], size=8),
                customdata=[[f"{1 - p.drop_rate:.0%}", "n/a" if k is None else f"{k:.0%}"] for p, k in zip(points, kept)],
                hovertemplate=(f"<b>{METHOD_TITLES[method]}</b><br>drop rate %{{x}} (keeps %{{customdata[0]}} of δ)<br>"
                               + ("accuracy %{y:.1f}%" if metric == "accuracy" else "perplexity %{y:.3f}")
                               + f"<br>keeps %{{customdata[1]}} of the fine-tune ({sweep.basis() or 'n/a'})<extra></extra>"),
            ), row=row, col=1)
    for row, metric in enumerate(rows, 1):
        value = _percent(sweep.accuracy(sweep.base_point)) if metric == "accuracy" else sweep.base_point.perplexity
        figure.add_trace(go.Scatter(
            x=categories, y=[value] * len(categories), mode="lines", name="base model", legendgroup="base",
            showlegend=row == 1, line=dict(color=NEUTRAL, dash="dot"),
            hovertemplate=("base model: " + ("accuracy %{y:.1f}%" if metric == "accuracy" else "perplexity %{y:.3f}") + "<extra></extra>"),
        ), row=row, col=1)
        if metric == "accuracy":
            figure.update_yaxes(title_text=f"accuracy (%, exact match; {tasks})", range=[-3, 103], row=row, col=1)
        else:
            figure.update_yaxes(title_text="perplexity (lower is better; log)", type="log", row=row, col=1)
    figure.update_xaxes(type="category", categoryorder="array", categoryarray=categories)
    figure.update_xaxes(title_text="drop rate p (share of δ's entries removed)", row=len(rows), col=1)
    return figure


# -- all of them -------------------------------------------------------------------------------

def all_figures(stats: RedundancyStats, sweep: SweepResult | None = None) -> dict[str, go.Figure]:
    """Every figure of the report, by name, in reading order."""
    figures = {
        "magnitudes": magnitude_distribution(stats),
        "relative_norm": relative_norm_by_layer(stats),
        "energy": energy_concentration(stats),
        "sign_conflicts": sign_conflicts_by_layer(stats),
        "similarity": task_vector_similarity(stats),
        "spectra": singular_value_spectra(stats),
        "spectral_energy": spectral_energy(stats),
        "subspace_overlap": subspace_overlap(stats),
    }
    if sweep is not None:
        figures["sweep"] = sweep_chart(sweep, model_colors(stats.labels).get(sweep.model))
    return figures


__all__ = [
    "PALETTE", "TEMPLATE", "all_figures", "energy_concentration", "magnitude_distribution", "model_colors",
    "relative_norm_by_layer", "sign_conflicts_by_layer", "singular_value_spectra", "spectral_energy",
    "subspace_overlap", "sweep_chart", "task_vector_similarity",
]
