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
    "spectra": (
        "Singular-value spectra: task matrices, their sum and the merge",
        ("Every 2-D weight matrix's task matrix δᵢ has singular values σ₁ ≥ σ₂ ≥ …; this plots them against their "
         "index on log-log axes, pooled over all weight matrices of the whole model (or, with the slider, of one layer), "
         "one line per model, with the spectrum of their plain sum Σδᵢ (task arithmetic) and, when a merged model "
         "was given, of its update θ_merged − θ_base. Hover shows the numerical rank: values above float32 rounding."),
        ("A line that drops by orders of magnitude after a few values is a low-rank update (a LoRA of rank r drops "
         "after r values per matrix): a few singular directions carry the task, the premise of the subspace methods "
         "(TSV-M, Iso-C/CTS), which keep and merge only those. The sum's line shows how the tasks add up: its "
         "largest values above every single task's mean shared directions, amplified. A merged update compares with "
         "the sum: sparsifying methods (TIES, DARE) turn a low-rank sum into a full-rank update with a long tail; "
         "TSV-M keeps each task's top directions (the union of the tasks' largest values); Iso-C/CTS flatten the "
         "spectrum to one value (a horizontal line)."),
    ),
    "spectral_energy": (
        "Effective rank: how low-rank each task vector is",
        ("The share of ‖δ‖²_F = Σσⱼ² held by the largest k% of the singular values of each weight matrix, summed "
         "over matrices: bold for the whole model, faint for each layer, dashed for the sum Σδᵢ and the merged update. "
         "The dotted diagonal is a flat spectrum, every singular value equal."),
        ("A curve at the top left means low effective rank: keeping 1-5% of each matrix's singular directions keeps "
         "most of what fine-tuning changed, so subspace methods (TSV-M keeps ⌊r/T⌋ directions per task) lose little, "
         "and a delta this redundant also survives DARE-style random dropping. A curve near the diagonal (full-rank "
         "updates) means truncating the SVD discards real changes: prefer element-wise methods, or larger ranks."),
    ),
    "subspace_overlap": (
        "Subspace interference between tasks",
        ("For each pair of tasks and each weight matrix: ‖UᵢᵀUⱼ‖²_F / k, the mean squared cosine of the principal "
         "angles between their top-k left singular subspaces (outputs; right: V, inputs), k = ⌊r/T⌋ for T models "
         "(TSV-M's per-task budget) capped at the matrices' numerical ranks; the line is the mean over pairs per "
         "layer, the faint dots single pairs (hover names them). Dotted: what random subspaces of that size give "
         "(k/m). With a merged model: dashed, the same overlap between the merge's responses to the tasks, "
         "range(δ_merged·Vᵢ) (outputs for task i's inputs; right: the inputs it reads for task i's outputs), and a "
         "third panel with each task's subspace alignment ratio (Iso-C): ‖Πδᵢ‖_F / ‖δᵢ‖_F, Π the projection onto the "
         "merged update's top Σkᵢ singular directions."),
        ("Near the dotted line, the tasks use unrelated directions and summing them (task arithmetic) hardly "
         "interferes. Well above it, they write into (or read from) shared directions, and a sum lets each distort "
         "the others: what TSV-M (which orthogonalizes the tasks' singular vectors) and Iso-CTS (which adds each "
         "task's own directions to the common ones, with a flat spectrum) are for; TSV-M reports interference "
         "highest in early layers. No merge separates responses to inputs the tasks share: after TSV-M or Iso-C/CTS "
         "the dashed lines keep the tasks' angles (left and right trade places), after TIES or DARE on low-rank tasks "
         "both rise (sparsifying spreads each task over many directions). An alignment near 1 means the merge keeps "
         "that task in its main directions; a task far below the others is the one the merge leaves behind."),
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

PAGE_CSS = """
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


def _spectral_findings(stats: RedundancyStats) -> list[str]:
    """How low-rank the task matrices are, how the merge's spectrum compares with the sum's, and how
    much the tasks' subspaces overlap (before and after merging), where measured."""
    spectral = stats.model.spectral
    if spectral is None or not spectral.matrices:
        return []
    out = []
    shares = [(html.escape(label), spectral.energy_top[label]) for label in stats.labels
              if spectral.energy_top[label]["0.01"] is not None]
    if shares:
        text = ", ".join(f"{label} {_percent(s['0.01'])} / {_percent(s['0.05'])} / {_percent(s['0.1'])}" for label, s in shares)
        line = f"Share of ‖δ‖²_F in the top 1% / 5% / 10% of each weight matrix's singular values: {text}"
        ranks = [t.spectral.spectra[label].numerical_rank for t in stats.tensors if t.spectral is not None
                 for label in stats.labels if t.spectral.spectra[label].values]
        widths = [t.spectral.spectra[label].rank for t in stats.tensors if t.spectral is not None
                  for label in stats.labels if t.spectral.spectra[label].values]
        if ranks and None not in ranks and max(ranks) <= 0.1 * min(widths):
            line += (f"; every changed matrix has numerical rank {min(ranks)}–{max(ranks)} (of {min(widths)}–{max(widths)}): "
                     "a low-rank update, as LoRA makes; subspace methods and random dropping lose little")
        elif min(s["0.1"] for _, s in shares) >= 0.5:
            line += ": low effective rank, where subspace methods (TSV-M, Iso-CTS) lose little"
        elif max(s["0.1"] for _, s in shares) < 0.3:
            line += ": nearly flat spectra (full-rank updates), where truncating the SVD would discard much"
        out.append(line + ".")
    if spectral.merged_energy_top is not None and spectral.merged_energy_top["0.1"] is not None:
        merged = html.escape(stats.merged_label or "merged")
        against = ""
        if spectral.sum_energy_top is not None and spectral.sum_energy_top["0.1"] is not None:
            against = f", against {_percent(spectral.sum_energy_top['0.1'])} for the plain sum Σδᵢ"
        rank = spectral.merged_spectrum.numerical_rank
        total_rank = spectral.sum_spectrum.numerical_rank if spectral.sum_spectrum is not None else None
        ranks = (f" (numerical rank {rank:,} of {spectral.merged_spectrum.rank:,} over all matrices; the sum's "
                 f"{total_rank:,})") if rank is not None and total_rank is not None else ""
        aligned = ", ".join(f"{html.escape(label)} {value:.2f}" for label, value in (spectral.merged_alignment or {}).items()
                            if value is not None)
        alignment = f"; the tasks' alignment with its top directions (Iso-C's ‖Πδᵢ‖/‖δᵢ‖): {aligned}" if aligned else ""
        out.append(f"The merged model {merged} keeps {_percent(spectral.merged_energy_top['0.1'])} of its update's "
                   f"‖δ‖²_F in the top 10% of singular values{against}{ranks}{alignment}.")
    pairs = [(a, b) for i, a in enumerate(stats.labels) for b in stats.labels[i + 1:]]
    before = [spectral.overlap_left[a][b] for a, b in pairs if spectral.overlap_left[a][b] is not None]
    before_right = [spectral.overlap_right[a][b] for a, b in pairs if spectral.overlap_right[a][b] is not None]
    if before and before_right and spectral.chance_left is not None:
        mean, mean_right = sum(before) / len(before), sum(before_right) / len(before_right)
        level = max(mean / max(spectral.chance_left, 1e-12), mean_right / max(spectral.chance_right, 1e-12))
        verdict = ("close to random: the tasks use unrelated directions and add up with little interference"
                   if level < 2 else "well above random: the tasks share directions, where summing them interferes "
                   "and TSV-M / Iso-CTS orthogonalize")
        line = (f"The tasks' top-k singular subspaces overlap by {mean:.3f} (left) / {mean_right:.3f} (right) on "
                f"average over matrices and pairs, against {spectral.chance_left:.3f} / {spectral.chance_right:.3f} for "
                f"random subspaces: {verdict}")
        after = spectral.merged_overlap_left
        if after is not None:
            values = [after[a][b] for a, b in pairs if after[a][b] is not None]
            values_right = [spectral.merged_overlap_right[a][b] for a, b in pairs if spectral.merged_overlap_right[a][b] is not None]
            if values and values_right:
                line += (f"; in the merged update {sum(values) / len(values):.3f} / "
                         f"{sum(values_right) / len(values_right):.3f}")
        out.append(line + ".")
    return out


def findings(stats: RedundancyStats) -> list[str]:
    """What the statistics say, one sentence each: how large each task vector is next to the base,
    the share of ‖δ‖² its top 20% of entries hold, the sign conflicts before and after TIES
    trimming, and (when computed) how low-rank the task matrices are, the merged update's spectrum
    and the overlap of the tasks' singular subspaces. Model labels are HTML-escaped, so each line
    is safe in HTML and in Markdown."""
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
    return out + _spectral_findings(stats)


def _findings(stats: RedundancyStats, sweep: SweepResult | None) -> list[str]:
    """The report's findings: the statistics', then where the sweep breaks (HTML)."""
    if sweep is None:
        return [*findings(stats), "The DARE sweep was not run; <code>python -m viz report ... --sweep</code> adds it (minutes)."]
    return [*findings(stats), *(html.escape(line) for line in sweep.summary())]


def figure_div(figure, div_id: str) -> str:
    """A figure as a ``<div>`` for a page that inlines plotly.js once in its head (``get_plotlyjs``)."""
    return pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


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
        div = figure_div(figure, f"figure-{name}")
        sections.append(
            f"<section id='{name}'><h2>{html.escape(title)}</h2><p><b>What it shows.</b> {html.escape(what)}</p>"
            f"<p><b>How to read it.</b> {html.escape(how)}</p>{extra}{div}</section>"
        )
    models = "".join(f"<li>{html.escape(label)}: <code>{html.escape(ref)}</code></li>" for label, ref in stats.models.items())
    merged = (f"<li>merged model {html.escape(stats.merged_label or '')}: <code>{html.escape(stats.merged)}</code> "
              "(in the singular-value views)</li>" if stats.merged else "")
    spectral = (f", singular values {stats.spectral_seconds:.1f} s of it" if stats.spectral_seconds is not None else "")
    findings = "".join(f"<li>{line}</li>" for line in _findings(stats, sweep))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Merge Studio: redundancy report</title><style>{PAGE_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><main>
<h1>Why merging works: redundancy of the task vectors</h1>
<p class="meta">base <code>{html.escape(stats.base)}</code> · {len(stats.labels)} fine-tuned model(s) · TIES density {stats.density:g}
· statistics in {stats.seconds:.1f} s{spectral} on {html.escape(stats.device)} · full numbers in <a href="{STATS}">{STATS}</a></p>
<ul>{models}{merged}</ul>
<p>Fine-tuning changes a model by a task vector δ = θ_fine-tuned − θ_base. These views show that δ is small and
highly redundant (most of it can be dropped, DARE), where the task vectors of several models interfere (sign
conflicts, which TIES's trimming and sign election address), and, seen as matrices, how low-rank they are and how
much their singular subspaces overlap (what TSV-M and Iso-C/CTS build on).</p>
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
