"""The redundancy report: one self-contained HTML page (plotly.js inlined, opens offline) with
every figure and what it shows, plus the numbers as JSON, written atomically to a folder."""

from __future__ import annotations

import html
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import plotly.io as pio
from plotly.offline import get_plotlyjs

from merging.checkpoint import atomic_output
from merging.errors import CheckpointError
from viz.figures import all_figures, model_colors
from viz.measures import TOP_FRACTIONS
from viz.stats import RedundancyStats
from viz.sweep import SweepResult

REPORT = "report.html"
STATS = "stats.json"
SWEEP = "sweep.json"

EXPLANATIONS = {
    "magnitudes": (
        "Delta magnitudes",
        ("How large the changes fine-tuning made to single weights are: the share of all entries of "
         "the task vector δ = θ_fine-tuned − θ_base whose |δ| falls in each log-spaced bin (estimated "
         "from a uniform sample of 4,096 entries per tensor). Entries that did not change at all (δ = 0) "
         "cannot sit on a log axis; their share is given in the legend."),
        ("A curve far to the left of the weights' own scale (typically 10⁻² to 10⁻¹) means the fine-tune "
         "moved each weight very little. A wide curve (several decades) means a few entries changed a "
         "lot while most barely moved: the situation in which dropping most of δ costs little (DARE) and "
         "keeping only the largest entries keeps most of it (TIES)."),
    ),
    "relative_norm": (
        "Relative size of the task vector per layer",
        ("For every layer: ‖δ‖₂ / ‖θ_base‖₂ over the layer's entries, in %, one line per model; the faint "
         "dots are the layer's individual tensors (hover for their names). Embeddings and the final norm "
         "are groups of their own."),
        ("Values of a few percent or less are usual: fine-tuning is a small step away from the base. "
         "Peaks show where a model put its change; layers where two models both peak are where their "
         "merge is most likely to interfere. A tensor at 0 was not changed (for example, not adapted by LoRA)."),
    ),
    "energy": (
        "How concentrated each task vector is",
        ("The share of the task vector's energy ‖δ‖² held by the largest k% of its entries, trimming each "
         "tensor on its own as TIES does (exact: no sampling). Bold: the whole model; faint: each layer. "
         "The dotted diagonal is a delta whose entries are all equal."),
        ("The further a curve lies above the diagonal, the more of δ sits in few entries. The value at 20% "
         "is exactly the share of ‖δ‖² that TIES at density 0.2 keeps. A curve near the diagonal means "
         "magnitude trimming removes as much as random dropping would."),
    ),
    "sign_conflicts": (
        "Sign conflicts between task vectors",
        ("Per layer, among entries where at least two models have a non-zero delta, the share where both "
         "signs occur (one model pushes the weight up, another down): solid before trimming, dashed after "
         "each task vector is trimmed to its top-density magnitudes per tensor (TIES). Hover shows the "
         "counts and the rate over all entries; faint dots are single tensors."),
        ("Conflicting entries are where a plain average of task vectors cancels out: TIES's sign election "
         "resolves them. Independent random deltas conflict on 50% of entries for two models (75% for "
         "three). A drop after trimming means the large entries, which TIES keeps, agree more than the small ones."),
    ),
    "similarity": (
        "Task-vector similarity",
        ("Cosine similarity cos(δa, δb) = ⟨δa, δb⟩ / (‖δa‖‖δb‖) of each pair of task vectors, over the whole "
         "model (left) and per layer (right). Blue is positive, red negative."),
        ("Near 0: the fine-tunes changed unrelated directions and add up without interfering (task "
         "arithmetic works best). Clearly positive: they share a direction (often a common format or style) "
         "and summing them overshoots it; negative: they undo each other."),
    ),
    "sweep": (
        "The DARE sweep: performance against drop rate",
        ("One fine-tuned model rebuilt by the merge engine from its task vector with a share p of the entries "
         "removed: at random with the survivors rescaled by 1/(1 − p) (DARE, solid), or keeping the largest "
         "magnitudes without rescale (TIES's trim, dashed), then evaluated. The dotted line is the base model."),
        ("DARE's claim is that the solid line stays flat to p = 0.9 or beyond: most of a fine-tune's delta is "
         "redundant. Where the solid line falls is where this model's redundancy ends. Magnitude trimming "
         "without rescale loses δ's overall scale, so it usually falls earlier at high p."),
    ),
}

_CSS = """
body { font-family: Inter, Helvetica, Arial, sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1150px; margin: 0 auto; padding: 24px 28px 60px; background: white; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 20px; margin: 40px 0 6px; border-top: 1px solid #ddd; padding-top: 20px; }
p { line-height: 1.5; max-width: 980px; } .meta { color: #666; font-size: 14px; }
table { border-collapse: collapse; font-size: 14px; margin: 10px 0; } th, td { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; } .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.finding { background: #f3f7fb; border-left: 4px solid #0072B2; padding: 8px 12px; }
"""


def _percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _summary_table(stats: RedundancyStats) -> str:
    colors = model_colors(stats.labels)
    head = "".join(f"<th>top {100 * f:g}%</th>" for f in TOP_FRACTIONS)
    rows = []
    for label in stats.labels:
        d = stats.model.deltas[label]
        shares = "".join(f"<td>{_percent(d.energy_top[f'{f:g}'])}</td>" for f in TOP_FRACTIONS)
        rows.append(
            f"<tr><td><span class='swatch' style='background:{colors[label]}'></span>{html.escape(label)}</td>"
            f"<td>{d.norm:.4g}</td><td>{_percent(d.relative_norm, 3)}</td><td>{_percent(d.zero_fraction)}</td>"
            f"<td>{d.quantiles['0.5']:.3g}</td><td>{d.quantiles['0.99']:.3g}</td>{shares}</tr>"
        )
    return (
        "<table><tr><th>model</th><th>‖δ‖₂</th><th>‖δ‖ / ‖θ_base‖</th><th>δ = 0</th><th>median |δ|</th>"
        f"<th>99th pct |δ|</th>{head}</tr>" + "".join(rows) + "</table>"
        "<p class='meta'>top k%: share of ‖δ‖² in the largest k% of entries of each tensor.</p>"
    )


def findings(stats: RedundancyStats) -> list[str]:
    """What the statistics say, one sentence each: how large each task vector is next to the base,
    the share of ‖δ‖² its top 20% of entries hold, and the sign conflicts before and after TIES
    trimming. Model labels are HTML-escaped, so each line is safe in HTML and in Markdown."""
    deltas = [(html.escape(label), stats.model.deltas[label]) for label in stats.labels]
    sizes = ", ".join(f"{label} {_percent(d.relative_norm, 3)}" for label, d in deltas)
    out = [f"Size of each task vector next to the base, ‖δ‖₂ / ‖θ_base‖₂ over the whole model: {sizes}."]
    shares = [(label, d.energy_top["0.2"]) for label, d in deltas if d.energy_top["0.2"] is not None]
    if shares:
        text = ", ".join(f"{label} {_percent(s)}" for label, s in shares)
        out.append(f"The largest 20% of entries of each tensor hold this share of ‖δ‖²: {text}.")
    c = stats.model.conflicts
    if c is not None and c.rate is not None:
        after = "no entry" if c.trimmed_rate is None else _percent(c.trimmed_rate)
        out.append(
            f"Where two or more models change a weight, their deltas disagree in sign on {_percent(c.rate)} of those "
            f"entries ({_percent(c.rate_all)} of all entries); after trimming to density {stats.density:g}, on {after} "
            f"({_percent(c.trimmed_rate_all)} of all entries)."
        )
    return out


def _findings(stats: RedundancyStats, sweep: SweepResult | None) -> list[str]:
    """The report's findings: the statistics', then where the sweep breaks (HTML)."""
    if sweep is None:
        return [*findings(stats), "The DARE sweep was not run; <code>python -m viz report ... --sweep</code> adds it (minutes)."]
    return [*findings(stats), *(html.escape(line) for line in sweep.summary())]


def render_html(stats: RedundancyStats, sweep: SweepResult | None = None) -> str:
    """The whole report as one HTML document, plotly.js inlined once."""
    figures = all_figures(stats, sweep)
    sections = []
    for name, figure in figures.items():
        title, what, how = EXPLANATIONS[name]
        extra = ""
        if name == "sweep" and sweep is not None:
            lines = "".join(f"<li>{html.escape(line)}</li>" for line in sweep.summary())
            extra = f"<div class='finding'><b>Where it breaks</b><ul>{lines}</ul></div>"
        div = pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id=f"figure-{name}",
                          config={"displaylogo": False, "responsive": True})
        sections.append(
            f"<section id='{name}'><h2>{html.escape(title)}</h2><p><b>What it shows.</b> {html.escape(what)}</p>"
            f"<p><b>How to read it.</b> {html.escape(how)}</p>{extra}{div}</section>"
        )
    models = "".join(f"<li>{html.escape(label)}: <code>{html.escape(ref)}</code></li>" for label, ref in stats.models.items())
    findings = "".join(f"<li>{line}</li>" for line in _findings(stats, sweep))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Merge Studio: redundancy report</title><style>{_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><main>
<h1>Why merging works: redundancy of the task vectors</h1>
<p class="meta">base <code>{html.escape(stats.base)}</code> · {len(stats.labels)} fine-tuned model(s) · TIES density {stats.density:g}
· statistics in {stats.seconds:.1f} s on {html.escape(stats.device)} · full numbers in <a href="{STATS}">{STATS}</a></p>
<ul>{models}</ul>
<p>Fine-tuning changes a model by a task vector δ = θ_fine-tuned − θ_base. These views show that δ is small and
highly redundant (most of it can be dropped, DARE) and where the task vectors of several models interfere (sign
conflicts, which TIES's trimming and sign election address).</p>
<h2>Summary</h2>{_summary_table(stats)}<ul>{findings}</ul>
{''.join(sections)}
</main></body></html>
"""


def prepare_output(out_dir: str | Path, overwrite: bool) -> bool:
    """Check ``out_dir`` before any work; returns whether writing must replace it.

    An existing empty folder is simply used; an existing non-empty one needs ``overwrite``.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output folder {out} exists and is not empty; choose another or pass --overwrite to replace it")
    return out.exists()


@contextmanager
def report_output(out_dir: str | Path, *, overwrite: bool = False, protected: list[Path] = ()) -> Iterator[Path]:
    """A hidden temporary folder that becomes ``out_dir`` when the block succeeds (and vanishes
    if it fails), checked first: not a non-empty folder unless ``overwrite``, and outside every
    ``protected`` folder (the source models)."""
    replace = prepare_output(out_dir, overwrite)
    with atomic_output(Path(out_dir), overwrite=replace, protected=list(protected)) as temp:
        yield temp


def write_files(folder: Path, stats: RedundancyStats, sweep: SweepResult | None = None) -> Path:
    """report.html, stats.json (and sweep.json) into ``folder``; returns the report's path."""
    (folder / REPORT).write_text(render_html(stats, sweep), encoding="utf-8")
    (folder / STATS).write_text(stats.to_json(indent=1) + "\n", encoding="utf-8")
    if sweep is not None:
        (folder / SWEEP).write_text(sweep.to_json(indent=1) + "\n", encoding="utf-8")
    return folder / REPORT


def write_report(out_dir: str | Path, stats: RedundancyStats, sweep: SweepResult | None = None, *,
                 overwrite: bool = False, protected: list[Path] = ()) -> Path:
    """Write the report of computed results into ``out_dir``, which appears atomically."""
    with report_output(out_dir, overwrite=overwrite, protected=protected) as temp:
        write_files(temp, stats, sweep)
    return Path(out_dir).expanduser().absolute() / REPORT
