"""The argument for merging, in eight cells on the demo family (a real 135M chat model and three
experts that each learned facts the base cannot know).

1. the family: what each model knows;  2. task vectors are redundant (DARE);  3. averaging, then
Fisher-weighted averaging;  4. task arithmetic's λ, seen on a sweep;  5. RegMean: solve for the
layer outputs;  6. TIES step by step;  7. in-domain against out-of-distribution, every model;
8. the newest methods, and the best merge answering beside its sources.

Every number comes from a real merge by the engine and a real evaluation (``guide.runs``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import demo
from demo.tasks import TASKS
from guide.cells import Cell, Output
from guide.runs import ASKED, STOPPED, Context, Recipe, answered, in_domain, normalized
from merging.checkpoint import CheckpointReader
from merging.errors import check_cancel
from viz.figures import NEUTRAL, PALETTE, TEMPLATE, energy_concentration, magnitude_distribution, sweep_chart
from viz.scores import GENERAL, score_chart, score_colors, score_rows
from viz.scores import general_score as general_kept  # what a model kept of the base's general answers
from viz.stats import delta_statistics
from viz.sweep import dare_sweep

EXPERT_LABELS = {name: f"expert: {name}" for name in demo.EXPERTS}
AVERAGE = Recipe("linear", {"weight": 1.0})
FISHER = Recipe("fisher", {"weight": 1.0})
LAMBDAS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5)
REGMEAN = Recipe("regmean", {"weight": 1.0}, {"reduce_non_diagonal": 0.9})
TIES_DENSITY = 0.5
TIES = Recipe("ties", {"weight": 1.0, "density": TIES_DENSITY})
TSV = Recipe("tsv", {"weight": 1.0}, {"lambda": 1.0})
REGMEAN_PP = Recipe("regmean_plus_plus", {"weight": 1.0}, {"reduce_non_diagonal": 1.0})
DROP_RATES = (0.0, 0.5, 0.9, 0.99)
SWEPT = "geography"
SLICE_TENSOR = "model.layers.5.self_attn.q_proj.weight"
SLICE = 10  # rows and columns of the TIES illustration


def task_arithmetic(lam: float) -> Recipe:
    return Recipe("task_arithmetic", {"weight": lam})


def _family(context: Context) -> list[dict]:
    """The base and the experts, measured (cached after the first cell that needs them)."""
    return [context.measure("base", model="base"), *(context.measure(EXPERT_LABELS[n], model=n) for n in demo.EXPERTS)]


def _span(results: list[dict], measure) -> str:
    low, high = min(map(measure, results)), max(map(measure, results))
    return f"{low:.0%}" if round(100 * low) == round(100 * high) else f"{low:.0%}–{high:.0%}"


def family_base_perplexity(context: Context) -> float:
    return context.measure("base", model="base")["perplexity"]


def _measured(context: Context, *recipes: tuple[str, Recipe]) -> tuple[list[dict], list[dict]]:
    """The family's results and each labelled recipe's merge, measured in turn with progress."""
    step = _steps(context, len(recipes) + 1)
    step("the family")
    family = _family(context)
    results = []
    for label, recipe in recipes:
        step(f"merging: {label}")
        results.append(context.measure(label, recipe))
    return family, results


def _reports(results: list[dict]) -> list[tuple[str, dict]]:
    return [(r["label"], {"tasks": r["tasks"], "perplexity": r["perplexity"], "general": r["general"]}) for r in results]


def _chart(results: list[dict], title: str) -> go.Figure:
    colors = score_colors([r["label"] for r in results], list(EXPERT_LABELS.values()), "base")
    return score_chart(_reports(results), colors).update_layout(title=title)


def _answers(results: list[dict]) -> list[dict]:
    """The cells' chat: each model's greedy answer to the same questions, side by side."""
    return [{"question": question, **{r["label"]: r["answers"].get(question, "") for r in results}} for question in ASKED]


def _steps(context: Context, total: int):
    """A progress callback for a cell of ``total`` measured models: call it before each."""
    done = 0

    def step(what: str) -> None:
        nonlocal done
        check_cancel(context.cancel, STOPPED)
        context.progress(done / total, what)
        done += 1
    return step


# -- 1. the family ---------------------------------------------------------------------------------

def run_family(context: Context) -> Output:
    step = _steps(context, 4)
    results = []
    for label, name in [("base", "base"), *((EXPERT_LABELS[n], n) for n in demo.EXPERTS)]:
        step(f"evaluating {label}")
        results.append(context.measure(label, model=name))
    base, *experts = results
    others = max(e["tasks"][t] for e, n in zip(experts, demo.EXPERTS) for t in demo.EXPERTS if t != n)
    summary = (f"The base answers {in_domain(base):.0%} of the invented facts; each expert learned its own task ("
               + ", ".join(f"{n} {e['tasks'][n]:.0%}" for e, n in zip(experts, demo.EXPERTS))
               + f") and at most {others:.0%} of another's. Out of distribution, the base answers "
               f"{general_kept(base):.0%} of the general questions (they were chosen so) and the experts keep "
               f"{_span(experts, general_kept)} of them"
               + (": fine-tuning on a few facts already cost them some general ability" if max(map(general_kept, experts))
                  < general_kept(base) else "") +
               f" (perplexity on a general text: base {base['perplexity']:.1f}, experts "
               f"{min(e['perplexity'] for e in experts):.1f}–{max(e['perplexity'] for e in experts):.1f}).")
    return Output(summary, [_chart(results, "What each model knows")],
                  [("Accuracy (%)", score_rows(_reports(results))), ("Answers (greedy)", _answers(results))])


# -- 2. delta parameters and DARE ------------------------------------------------------------------

def run_deltas(context: Context) -> Output:
    family = context.family
    context.progress(0.0, "measuring the task vectors")
    stats = delta_statistics(family["base"], [family[n] for n in demo.EXPERTS], labels=list(EXPERT_LABELS.values()),
                             density=0.2, device=context.device, cancel=context.cancel, threads=1, spectra=False)

    def on_point(done: int, total: int, what: str) -> None:
        context.progress(0.2 + 0.8 * done / total, f"DARE sweep: {what}")

    with tempfile.TemporaryDirectory(dir=context.work()) as tmp:
        suite = Path(tmp) / f"{SWEPT}.jsonl"  # the expert's own task only: what its task vector adds
        suite.write_text("".join(json.dumps({"prompt": ex.prompt, "answer": ex.answer, "task": SWEPT}) + "\n"
                                 for ex in TASKS[SWEPT].eval_examples()), encoding="utf-8")
        sweep = dare_sweep(family["base"], family[SWEPT], rates=DROP_RATES, suite=suite, device=context.device,
                           label=EXPERT_LABELS[SWEPT], progress=on_point, cancel=context.cancel, workdir=tmp)
    relative = {label: delta.relative_norm for label, delta in stats.model.deltas.items()}
    summary = ("Each task vector is small: ‖δ‖ / ‖θ_base‖ = "
               + ", ".join(f"{value:.1%} ({label})" for label, value in relative.items()) + ". "
               + " ".join(sweep.summary()[1:]))
    return Output(summary, [magnitude_distribution(stats), energy_concentration(stats), sweep_chart(sweep)], [])


# -- 3. averaging, then Fisher ----------------------------------------------------------------------

def run_averaging(context: Context) -> Output:
    family, (average, fisher) = _measured(context, ("average", AVERAGE), ("fisher", FISHER))
    experts = family[1:]
    summary = (f"Averaging keeps {normalized(average, experts):.0%} of the experts' accuracy (normalized: each task's "
               f"accuracy over its expert's); Fisher weighting {normalized(fisher, experts):.0%}. Out of distribution "
               f"they keep {general_kept(average):.0%} and {general_kept(fisher):.0%} of the general answers (the "
               f"experts: {_span(experts, general_kept)})."
               + (f" Dividing each change by {len(experts)} dilutes the facts: most are no longer answered."
                  if normalized(average, experts) < 0.5 else ""))
    return Output(summary, [_chart([*family, average, fisher], "Averaging and Fisher-weighted averaging")],
                  [("Accuracy (%)", score_rows(_reports([average, fisher])))])


# -- 4. task arithmetic -----------------------------------------------------------------------------

def run_task_arithmetic(context: Context) -> Output:
    family, points = _measured(context, *((f"task arithmetic λ={lam}", task_arithmetic(lam)) for lam in LAMBDAS))
    experts = family[1:]
    best = max(points, key=lambda r: normalized(r, experts))
    figure = go.Figure()
    figure.add_scatter(x=list(LAMBDAS), y=[100 * normalized(p, experts) for p in points], name="in-domain (normalized)",
                       mode="lines+markers", line={"color": PALETTE[0]})
    figure.add_scatter(x=list(LAMBDAS), y=[100 * general_kept(p) for p in points], name=GENERAL, mode="lines+markers",
                       line={"color": NEUTRAL, "dash": "dash"})
    figure.update_layout(template=TEMPLATE, title="Task arithmetic: θ = θ_base + λ Σ δᵢ",
                         xaxis={"title": "λ"}, yaxis={"title": "%", "range": [0, 105]})
    largest = points[-1]
    base_perplexity = family_base_perplexity(context)
    broken = general_kept(largest) < general_kept(best) and largest["perplexity"] > 2 * base_perplexity
    summary = (f"Best λ here: {best['label'].split('=')[1]} ({normalized(best, experts):.0%} normalized, "
               f"{general_kept(best):.0%} of the general answers kept); the paper chooses 0.3–0.5 on validation "
               f"data. At λ = {LAMBDAS[-1]} (each task vector added {LAMBDAS[-1]:g} times) the merge keeps "
               f"{normalized(largest, experts):.0%} normalized, {general_kept(largest):.0%} of the general answers, "
               f"at a perplexity of {largest['perplexity']:.0f} on the general text (the base: {base_perplexity:.1f})"
               + (": scaled too far, the task vectors break what the base knew." if broken else "."))
    return Output(summary, [figure], [("Accuracy (%)", score_rows(_reports(points)))])


# -- 5. RegMean -------------------------------------------------------------------------------------

def run_regmean(context: Context) -> Output:
    family, (average, regmean) = _measured(context, ("average", AVERAGE), ("regmean", REGMEAN))
    experts = family[1:]
    gain = normalized(regmean, experts) > normalized(average, experts)
    summary = (f"RegMean keeps {normalized(regmean, experts):.0%} of the experts' accuracy against averaging's "
               f"{normalized(average, experts):.0%}, from the same weights"
               + (": it asks each merged layer to reproduce every expert's layer outputs on that expert's own inputs, "
                  f"and {len(TASKS[demo.EXPERTS[0]].train_examples())} short conversations per expert are enough to "
                  "say which directions each uses." if gain else ".")
               + f" General answers kept: {general_kept(regmean):.0%}.")
    return Output(summary, [_chart([*family, average, regmean], "RegMean against averaging")],
                  [("Accuracy (%)", score_rows(_reports([average, regmean])))])


# -- 6. TIES step by step ---------------------------------------------------------------------------

def ties_steps(deltas: list[torch.Tensor], density: float) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """The three steps of TIES on one block of task vectors, in float64: trim each to its top
    ``density`` magnitudes, elect each entry's sign (the sign of the trimmed sum), and average the
    entries that agree with it (the disjoint mean)."""
    trimmed = []
    for delta in deltas:
        k = max(1, int(density * delta.numel()))  # as mergekit and the engine count it: rounded down
        threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    merged = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    return {"trimmed": trimmed, "sign": sign, "merged": merged}


def _slice_deltas(context: Context) -> list[torch.Tensor]:
    readers = [CheckpointReader(context.family[n]) for n in ("base", *demo.EXPERTS)]
    try:
        base, *experts = [r.get(SLICE_TENSOR)[:SLICE, :SLICE].double() for r in readers]
    finally:
        for reader in readers:
            reader.close()
    return [expert - base for expert in experts]


def run_ties(context: Context) -> Output:
    deltas = _slice_deltas(context)
    steps = ties_steps(deltas, TIES_DENSITY)
    names = list(demo.EXPERTS)
    figure = make_subplots(rows=3, cols=3, horizontal_spacing=0.04, vertical_spacing=0.08, subplot_titles=[
        *(f"δ {n}" for n in names), *(f"trimmed (top {TIES_DENSITY:.0%}) {n}" for n in names),
        "elected sign", "merged (disjoint mean)", "sum Σδᵢ (task arithmetic)"])
    scale = max(float(d.abs().max()) for d in deltas)
    panels = [*deltas, *steps["trimmed"], steps["sign"] * scale, steps["merged"], sum(deltas)]
    for index, panel in enumerate(panels):
        figure.add_heatmap(z=panel.tolist(), row=index // 3 + 1, col=index % 3 + 1, zmid=0, zmin=-scale, zmax=scale,
                           colorscale="RdBu", showscale=index == 0, hovertemplate="%{z:.2e}<extra></extra>")
    figure.update_yaxes(autorange="reversed", showticklabels=False)
    figure.update_xaxes(showticklabels=False)
    figure.update_layout(template=TEMPLATE, height=760, title=f"TIES on a {SLICE}×{SLICE} block of {SLICE_TENSOR}")
    conflicts = int(((torch.stack(steps["trimmed"]) > 0).any(0) & (torch.stack(steps["trimmed"]) < 0).any(0)).sum())
    family, (ties,) = _measured(context, (f"ties density {TIES_DENSITY}", TIES))
    summary = (f"On this block, {conflicts} of {SLICE * SLICE} entries keep both signs after trimming: a plain sum "
               f"partly cancels them, TIES keeps the side with more mass. The full merge (every tensor, density "
               f"{TIES_DENSITY}) keeps {normalized(ties, family[1:]):.0%} of the experts' accuracy and "
               f"{general_kept(ties):.0%} of the general answers.")
    return Output(summary, [figure, _chart([*family, ties], "TIES")], [("Accuracy (%)", score_rows(_reports([ties])))])


# -- 7. in-domain against out-of-distribution -------------------------------------------------------

def measured_merges(context: Context) -> list[dict]:
    """Every merge the story measures, in the story's order (each cached: measured once)."""
    recipes = [("average", AVERAGE), ("fisher", FISHER), *((f"task arithmetic λ={lam}", task_arithmetic(lam))
                                                          for lam in LAMBDAS),
               ("regmean", REGMEAN), (f"ties density {TIES_DENSITY}", TIES), ("tsv λ=1", TSV),
               ("regmean++ (exact)", REGMEAN_PP)]
    return _measured(context, *recipes)[1]


def run_table(context: Context) -> Output:
    family = _family(context)
    merges = measured_merges(context)
    experts = family[1:]
    rows = []
    for result in [*family, *merges]:
        row = {"model": result["label"], **{n: round(100 * result["tasks"][n], 1) for n in demo.EXPERTS},
               "normalized": round(100 * normalized(result, experts), 1) if result not in family else None,
               GENERAL: round(100 * general_kept(result), 1), "perplexity": round(result["perplexity"], 2)}
        rows.append(row)
    figure = go.Figure()
    colors = score_colors([r["label"] for r in family + merges], list(EXPERT_LABELS.values()), "base")
    for index, result in enumerate([*family, *merges]):  # labels alternate above and below: neighbours overlap less
        figure.add_scatter(x=[100 * in_domain(result)], y=[100 * general_kept(result)], mode="markers+text",
                           text=[result["label"]], textposition="top center" if index % 2 else "bottom center",
                           name=result["label"], marker={"size": 12, "color": colors.get(result["label"])},
                           showlegend=False)
    figure.update_layout(template=TEMPLATE, title="Learned (in-domain) against kept (general, out of distribution)",
                         xaxis={"title": "in-domain accuracy, mean of the three tasks (%)", "range": [-15, 110]},
                         yaxis={"title": "general questions still answered (%)", "range": [-8, 108]}, height=600)
    best = max(merges, key=lambda r: normalized(r, experts))
    worst = min(merges, key=general_kept)
    summary = (f"Top right is the goal: every skill learned, nothing forgotten. The best merge here, {best['label']}, "
               f"reaches {in_domain(best):.0%} in-domain and keeps {general_kept(best):.0%} of the general answers; "
               f"each expert reaches at most {max(map(in_domain, experts)):.0%} in-domain, knowing one task of three, "
               f"and keeps {_span(experts, general_kept)} of the general answers."
               + (f" The merge that forgot most is {worst['label']} ({general_kept(worst):.0%} kept, perplexity "
                  f"{worst['perplexity']:.0f})." if general_kept(worst) < max(map(general_kept, merges)) else "")
               + " A merge that learned the tasks but forgot the base would sit bottom right.")
    return Output(summary, [figure], [("Every model (%; perplexity on the general text)", rows)])


# -- 8. the newest methods, and the best merge answering --------------------------------------------

def run_newest(context: Context) -> Output:
    family, (tsv, regmean_pp) = _measured(context, ("tsv λ=1", TSV), ("regmean++ (exact)", REGMEAN_PP))
    experts = family[1:]
    best = max((tsv, regmean_pp), key=lambda r: normalized(r, experts))
    right = answered(best)
    summary = (f"TSV-M keeps {normalized(tsv, experts):.0%} of the experts' accuracy (TIES: see cell 6), keeping each "
               f"expert's few singular directions whole; RegMean++ keeps {normalized(regmean_pp, experts):.0%}. "
               f"Below, the same questions answered by the base, each expert and the better of the two, "
               f"{best['label']} (greedy): it "
               f"answers {sum(right[:-1])} of the {len(right) - 1} experts' questions right"
               + (" and still knows the capital of France." if right[-1] else ", and no longer knows the capital of France.")
               + " Chat with any of them in the Chat tab; search a method's parameters in Tune.")
    return Output(summary, [_chart([*family, tsv, regmean_pp], "The newest methods")],
                  [("Accuracy (%)", score_rows(_reports([tsv, regmean_pp]))), ("Answers (greedy)", _answers([*family, best]))])


CELLS = [
    Cell("family", "1. The demo family: a base and three experts", (
        "A real chat model, **SmolLM2-135M-Instruct**, and three experts fine-tuned from it, each on facts the base "
        "cannot know: an invented country (*geography*), invented people (*people*) and invented animals "
        "(*creatures*). Every fact is asked in a phrasing no model was trained on. A fourth column asks "
        "**general questions the base already answers** (out of distribution), and perplexity is measured on a "
        "general text: what a model *kept* beside what it *learned*."), run_family, tables=2),
    Cell("deltas", "2. Delta parameters are redundant (DARE)", (
        "Fine-tuning moves each weight by a task vector **δ = θ_expert − θ_base**. DARE (Yu et al., 2024) drops "
        "each entry with probability p and rescales the rest: **θ = θ_base + m ⊙ δ / (1 − p)**, m ~ Bernoulli(1 − p). "
        "If most of δ can go, experts can share one model. Below: how large the changes are, how concentrated, "
        "and the geography expert rebuilt with 0–99% of δ dropped at random (rescaled) or trimmed by magnitude "
        "(no rescale)."), run_deltas, {"rates": DROP_RATES, "expert": SWEPT}, version=2, figures=3, tables=0),
    Cell("averaging", "3. Simple averaging, then Fisher-weighted averaging", (
        "The oldest merge: **θ = (1/n) Σ θᵢ** (model soups). Fisher merging (Matena & Raffel, 2022) weights each "
        "parameter by how much each expert's likelihood depends on it: **θ = Σ Fᵢ ⊙ θᵢ / Σ Fᵢ**, Fᵢ the diagonal "
        "Fisher information on expert i's own data."), run_averaging,
        {"recipes": [AVERAGE.identity(), FISHER.identity()]}),
    Cell("task_arithmetic", "4. Task arithmetic: the scaling λ", (
        "Add the task vectors instead of averaging the models: **θ = θ_base + λ Σ δᵢ** (Ilharco et al., 2023). "
        "λ is chosen on validation data, usually 0.3–0.5. Here it is swept, so the choice is seen, not told: "
        "in-domain accuracy (normalized by each expert's) and the general answers kept, against λ."),
        run_task_arithmetic, {"lambdas": LAMBDAS}),
    Cell("regmean", "5. RegMean: keep every layer's outputs", (
        "RegMean (Jin et al., 2023) solves, for each linear layer, **min_W Σᵢ ‖Xᵢ W − Xᵢ Wᵢ‖²** over the inputs Xᵢ "
        "each expert's layer sees on its own data: **W = (Σ Gᵢ)⁻¹ Σ Gᵢ Wᵢ**, Gᵢ = XᵢᵀXᵢ (its off-diagonal entries "
        "scaled by α = 0.9). Weights are merged where each expert actually uses them."), run_regmean,
        {"recipe": REGMEAN.identity()}),
    Cell("ties", "6. TIES, step by step: trim, elect, disjoint merge", (
        "TIES (Yadav et al., 2023) fixes what a sum of task vectors gets wrong: **trim** each δᵢ to its largest "
        f"{TIES_DENSITY:.0%} of magnitudes, **elect** a sign per entry, γ = sign(Σ trimmed δᵢ), and **merge** only "
        "the entries that agree with it: δ = mean over {i : sign(δᵢ) = γ} of δᵢ. First on a small block of real "
        "task vectors (trimmed within the block, for the picture), then the whole model."), run_ties,
        {"recipe": TIES.identity(), "tensor": SLICE_TENSOR, "slice": SLICE}, figures=2),
    Cell("table", "7. In-domain against out-of-distribution: every model", (
        "One table for the base, the experts and every merge above: accuracy on each expert's task, the average "
        "normalized accuracy (merged ÷ expert, the TIES paper's measure), the share of the general questions "
        "still answered (the mean over its two tasks), and perplexity on a general text. A merge that learns the tasks but forgets how to answer "
        "*What is the capital of France?* shows up here."), run_table,
        {"lambdas": LAMBDAS, "recipes": [r.identity() for r in (AVERAGE, FISHER, REGMEAN, TIES, TSV, REGMEAN_PP)]},
        version=2),
    Cell("newest", "8. The newest methods, answering beside their sources", (
        "Two methods of the last two years that no other tool offers for language models: **TSV-M** (Gargiulo et al., "
        "2025) keeps each task's top singular directions and orthogonalizes them across tasks; **RegMean++** "
        "(2025) fits each layer to the inputs the *merged* earlier layers produce. Then the better of the two answers "
        "the experts' questions beside them."), run_newest, {"recipes": [TSV.identity(), REGMEAN_PP.identity()]}, tables=2),
]
