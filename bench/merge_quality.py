#!/usr/bin/env python
"""Quality table: what each merge method keeps of the demo experts' skills.

Builds (or reuses) the demo family, evaluates the base and each expert on the three held-out
task suites, merges the three experts with every engine method at default and swept settings,
and reports per-task exact-match accuracy and the average normalized accuracy (merged accuracy
on a task divided by that task's expert's accuracy, as in the TIES paper), and, out of
distribution, the share of the general suite (questions the base answers) each model still
answers and its perplexity on a general text. A DARE sweep drops
90-99% of one expert's delta to show where the redundancy ends.

    python bench/merge_quality.py                 # prints Markdown tables (~10 min on 2 CPU cores)
    python bench/merge_quality.py --json out.json --readme   # also rewrite the README's table
    python bench/merge_quality.py --json out.json --methods iso_c,tsv   # re-run only these rows, keep the rest
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import demo  # noqa: E402
from evaluation import evaluate  # noqa: E402
from merging.engine import merge  # noqa: E402
from merging.methods import REGISTRY  # noqa: E402
from merging.recipe import load_recipe  # noqa: E402

# (label, method, per-model parameters, global parameters)
MERGES = [
    ("linear (simple average)", "linear", {"weight": 1.0}, {}),
    ("task_arithmetic λ=0.3", "task_arithmetic", {"weight": 0.3}, {}),
    ("task_arithmetic λ=0.5", "task_arithmetic", {"weight": 0.5}, {}),
    ("task_arithmetic λ=1.0", "task_arithmetic", {"weight": 1.0}, {}),
    ("ties density 0.2", "ties", {"weight": 1.0, "density": 0.2}, {}),
    ("ties density 0.5", "ties", {"weight": 1.0, "density": 0.5}, {}),
    ("ties density 0.2, normalize false, λ=0.5", "ties", {"weight": 1.0, "density": 0.2}, {"normalize": False, "lambda": 0.5}),
    ("dare_linear density 0.1 (drop 90%), w=1", "dare_linear", {"weight": 1.0, "density": 0.1}, {}),
    ("dare_linear density 0.3, w=0.5", "dare_linear", {"weight": 0.5, "density": 0.3}, {}),
    ("dare_ties density 0.1, w=1", "dare_ties", {"weight": 1.0, "density": 0.1}, {}),
    ("dare_ties density 0.3, w=1", "dare_ties", {"weight": 1.0, "density": 0.3}, {}),
    ("breadcrumbs density 0.2, w=1", "breadcrumbs", {"weight": 1.0, "density": 0.2, "gamma": 0.01}, {}),
    ("breadcrumbs_ties density 0.2, w=1", "breadcrumbs_ties", {"weight": 1.0, "density": 0.2, "gamma": 0.01}, {}),
    ("della density 0.3, epsilon 0.1, w=1", "della", {"weight": 1.0, "density": 0.3, "epsilon": 0.1}, {}),
    ("della_linear density 0.3, epsilon 0.1, w=0.5", "della_linear", {"weight": 0.5, "density": 0.3, "epsilon": 0.1}, {}),
    ("sce select_topk 1.0 (defaults)", "sce", {}, {}),
    ("sce select_topk 0.3", "sce", {}, {"select_topk": 0.3}),
    ("model_stock", "model_stock", {}, {}),
    ("multislerp (equal weights)", "multislerp", {"weight": 1.0}, {}),
    ("karcher", "karcher", {}, {}),
    ("ram", "ram", {}, {}),
    ("ramplus_tl", "ramplus_tl", {}, {}),
    # data-aware: each expert calibrated on its own task's training conversations
    ("fisher (calibration: own task)", "fisher", {"weight": 1.0}, {}),
    ("regmean α=0.9 (calibration: own task)", "regmean", {"weight": 1.0}, {"reduce_non_diagonal": 0.9}),
    ("regmean α=0.6", "regmean", {"weight": 1.0}, {"reduce_non_diagonal": 0.6}),
    ("regmean α=1.0 (exact)", "regmean", {"weight": 1.0}, {"reduce_non_diagonal": 1.0}),
    ("regmean_plus_plus α=0.9", "regmean_plus_plus", {"weight": 1.0}, {"reduce_non_diagonal": 0.9}),
    ("regmean_plus_plus α=1.0 (exact)", "regmean_plus_plus", {"weight": 1.0}, {"reduce_non_diagonal": 1.0}),
    # beyond mergekit, weight-only (issue #14); λ swept where the papers tune it on validation data
    ("iso_c λ=1.0", "iso_c", {"weight": 1.0}, {"lambda": 1.0}),
    ("iso_c λ=1.5 (suggested)", "iso_c", {"weight": 1.0}, {"lambda": 1.5}),
    ("iso_c λ=2.0", "iso_c", {"weight": 1.0}, {"lambda": 2.0}),
    ("iso_cts λ=1.0", "iso_cts", {"weight": 1.0}, {"lambda": 1.0}),
    ("iso_cts λ=1.5 (suggested)", "iso_cts", {"weight": 1.0}, {"lambda": 1.5}),
    ("tsv λ=1.0 (the paper's)", "tsv", {"weight": 1.0}, {"lambda": 1.0}),
    ("tsv λ=1.5", "tsv", {"weight": 1.0}, {"lambda": 1.5}),
    ("consensus_ta k=2, w=1", "consensus_ta", {"weight": 1.0}, {}),
    ("consensus_ta k=2, w=0.5", "consensus_ta", {"weight": 0.5}, {}),
    ("consensus_ties k=2, density 0.2", "consensus_ties", {"weight": 1.0, "density": 0.2}, {}),
    ("wudi (Adam, 300 steps: the paper's)", "wudi", {"weight": 1.0}, {}),
    ("wudi solver exact", "wudi", {"weight": 1.0}, {"solver": "exact"}),
]
DROP_RATES = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99)
SWEEP_EXPERT = "geography"


def recipe_for(method: str, family: dict[str, Path], per_model: dict, global_params: dict, experts=demo.EXPERTS) -> str:
    lines = [f"merge_method: {method}"]
    if REGISTRY[method].spec.base == "origin":  # task vectors are measured from it (linear: no base, as before)
        lines.append(f"base_model: {family['base']}")
    lines.append("models:")
    for name in experts:
        lines.append(f"  - model: {family[name]}")
        lines.append(f"    parameters: {json.dumps(per_model)}")
        if REGISTRY[method].spec.calibration:
            lines.append(f"    calibration: {name}")  # the expert's own training conversations
    if global_params:
        lines.append(f"parameters: {json.dumps(global_params)}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def measured(folder: Path) -> dict:
    """Accuracy per task (in-domain), the general suite's mean (out of distribution: what the model
    kept of what the base knows) and perplexity on the general text."""
    report = evaluate(folder, suite="zoo", device="cpu", general=True)
    return {"scores": report.tasks, "general": sum(report.general.values()) / len(report.general),
            "perplexity": report.perplexity}


def merged_scores(recipe_text: str, workdir: Path, general: bool = True) -> dict:
    out = workdir / "merged"
    merge(load_recipe(recipe_text), out, overwrite=True, device="cpu")
    return measured(out) if general else {"scores": evaluate(out, suite="zoo", device="cpu").tasks}


def normalized(scores: dict[str, float], experts: dict[str, dict]) -> float:
    ratios = [scores[task] / experts[task]["scores"][task] for task in demo.EXPERTS if experts[task]["scores"][task] > 0]
    return sum(ratios) / len(ratios)


def row(label: str, entry: dict, norm: float | None) -> str:
    cells = " | ".join(f"{entry['scores'][t]:.0%}" for t in demo.EXPERTS)
    return (f"| {label} | {cells} | {'' if norm is None else f'{norm:.0%}'} | {entry['general']:.0%} "
            f"| {entry['perplexity']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write all numbers as JSON here")
    parser.add_argument("--readme", action="store_true", help="rewrite the table between the README's quality markers")
    parser.add_argument("--methods", help="comma-separated methods: run only their rows and keep the other rows "
                                          "(and the base, experts and DARE sweep) from the --json file")
    args = parser.parse_args()

    started = time.perf_counter()
    family = demo.ensure_family(lambda message: print(message, file=sys.stderr))
    selected = set(args.methods.split(",")) if args.methods else None
    if selected is not None and not (args.json and args.json.is_file()):
        parser.error("--methods keeps the other rows from an earlier --json file; give one")
    if selected is not None:
        previous = json.loads(args.json.read_text())
        results = {**previous, "dare_sweep": {float(k): v for k, v in previous["dare_sweep"].items()}}
    else:
        results = {"base": measured(family["base"]), "experts": {}, "merges": {}, "dare_sweep": {}}
        for name in demo.EXPERTS:
            results["experts"][name] = measured(family[name])
            print(f"expert {name}: {results['experts'][name]}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="merge-quality-") as tmp:
        workdir = Path(tmp)
        for label, method, per_model, global_params in MERGES:
            if selected is not None and method not in selected:
                continue
            entry = merged_scores(recipe_for(method, family, per_model, global_params), workdir)
            results["merges"][label] = {**entry, "normalized": normalized(entry["scores"], results["experts"])}
            print(f"{label}: {entry}", file=sys.stderr)
        for rate in DROP_RATES if selected is None else ():
            text = recipe_for("dare_linear", family, {"weight": 1.0, "density": max(1e-6, 1.0 - rate)}, {}, experts=(SWEEP_EXPERT,))
            results["dare_sweep"][rate] = merged_scores(text, workdir, general=False)["scores"][SWEEP_EXPERT]
            print(f"DARE drop {rate:.0%}: {results['dare_sweep'][rate]:.0%}", file=sys.stderr)
    results["merges"] = {label: results["merges"][label] for label, *_ in MERGES if label in results["merges"]}  # table order
    if args.json:  # first: a slip in the rendering below must not lose an hour of measurements
        args.json.write_text(json.dumps(results, indent=2, default=str))

    header = ("| model | " + " | ".join(demo.EXPERTS) + " | avg. normalized | general (kept) | perplexity |\n|---|"
              + "---|" * (len(demo.EXPERTS) + 3))
    lines = [header, row("base (SmolLM2-135M-Instruct)", results["base"], None)]
    lines += [row(f"expert: {name}", results["experts"][name], None) for name in demo.EXPERTS]
    lines += [row(label, r, r["normalized"]) for label, r in results["merges"].items()]
    table = "\n".join(lines)
    expert_score = results["experts"][SWEEP_EXPERT]["scores"][SWEEP_EXPERT]
    sweep = "| drop rate | " + " | ".join(f"{r:.0%}" for r in DROP_RATES) + " |\n|---|" + "---|" * len(DROP_RATES) + "\n"
    sweep += f"| {SWEEP_EXPERT} accuracy (expert: {expert_score:.0%}) | " + " | ".join(
        f"{results['dare_sweep'][r]:.0%}" for r in DROP_RATES) + " |"
    print(table + "\n\nDARE (dare_linear on one expert, rescaled by 1/density):\n\n" + sweep)
    print(f"\n({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.readme:
        readme = REPO / "README.md"
        text = readme.read_text(encoding="utf-8")
        start, end = "<!-- quality-table -->", "<!-- /quality-table -->"
        if start in text and end in text:
            body = f"{start}\n{table}\n\nDARE sweep:\n\n{sweep}\n{end}"
            text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
            readme.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
