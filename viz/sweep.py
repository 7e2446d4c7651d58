"""The DARE sweep: how much of one fine-tuned model's task vector can go before its skill does.

DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099) drops each entry of δ = θ_ft − θ_base
with probability p and rescales the survivors: θ = θ_base + m ⊙ δ / (1 − p), m ~ Bernoulli(1 − p).
Its headline chart, performance against p, stays flat to p ≈ 0.9 on fine-tuned LLMs. Against it
we put magnitude trimming at the same density (TIES's trim, https://arxiv.org/abs/2306.01708,
without rescale): θ = θ_base + δ ⊙ [|δ| among the top 1 − p of its tensor].

Both are real merges by the engine, of the one model with weight 1 and density 1 − p:

- random drop: ``dare_linear`` (rescale by 1/density is its default);
- magnitude trim: ``ties``. With a single model the sign election elects that model's own
  sign everywhere, the disjoint mean divides by its weight (1) and ``rescale`` is off, so the
  result is exactly θ_base + trimmed δ. (``task_arithmetic`` has no trim; ``breadcrumbs`` also
  drops the top ``gamma``.)

Each point is evaluated with ``evaluation`` (task accuracy on a suite, perplexity on a
text) and deleted; p = 0 is the fine-tuned model itself.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from evaluation import evaluate, load_suite
from merging.engine import merge
from merging.errors import MergeStudioError, check_cancel
from merging.recipe import load_recipe
from merging.sources import SourcePolicy, resolve_model

DROP_RATES = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99)
METHODS = {"random": "dare_linear", "magnitude": "ties"}
METHOD_TITLES = {"random": "random drop + rescale (DARE)", "magnitude": "magnitude trim, no rescale (TIES trim)"}
HOLDS = 0.9  # a drop rate "holds" while it keeps at least 90% of the fine-tuning gain

ProgressFn = Callable[[int, int, str], None]  # (evaluations done, total, what was just done)


@dataclass
class SweepPoint:
    """One evaluated model: ``method`` 'random' or 'magnitude' at ``drop_rate``; 'base' for the base."""

    method: str
    drop_rate: float
    tasks: dict[str, float] = field(default_factory=dict)  # task -> exact-match accuracy
    perplexity: float | None = None
    seconds: float = 0.0


@dataclass
class SweepResult:
    """Every point of a sweep, the base's scores, and which tasks the accuracy averages.

    ``tasks`` are the suite's tasks on which the fine-tuned model beats the base (the skills
    its task vector adds), or all of them when it beats it on none.
    """

    model: str  # label of the swept model
    ref: str
    base: str
    suite: str | None
    text: str | None
    seed: int
    tasks: list[str]
    base_point: SweepPoint
    points: list[SweepPoint]

    def accuracy(self, point: SweepPoint) -> float | None:
        """Mean accuracy over ``tasks`` (None without a suite)."""
        scores = [point.tasks[t] for t in self.tasks if t in point.tasks]
        return sum(scores) / len(scores) if scores else None

    def series(self, method: str) -> list[SweepPoint]:
        return sorted((p for p in self.points if p.method == method), key=lambda p: p.drop_rate)

    def basis(self) -> str | None:
        """What "keeping the fine-tune" is measured on, the first that applies: 'accuracy gain'
        (the fine-tune beats the base on the swept tasks), 'perplexity gain' (it has a lower
        perplexity than the base on the text), 'accuracy' or 'perplexity' (relative to the
        fine-tune alone), or None when nothing was measured."""
        zero, base = self.points[0], self.base_point
        a0, ab = self.accuracy(zero), self.accuracy(base)
        if a0 is not None and ab is not None and a0 > ab:
            return "accuracy gain"
        if zero.perplexity is not None and base.perplexity is not None and base.perplexity > zero.perplexity:
            return "perplexity gain"
        if a0:
            return "accuracy"
        return "perplexity" if zero.perplexity is not None else None

    def retained(self, point: SweepPoint) -> float | None:
        """Share of the fine-tune a point keeps, on ``basis()``: with a = accuracy, ℓ = log perplexity,
        0 the fine-tune and b the base: (a − a_b)/(a₀ − a_b), (ℓ_b − ℓ)/(ℓ_b − ℓ₀), a/a₀ or ℓ₀/ℓ.
        1 at drop rate 0 by definition; None when there is no basis."""
        basis = self.basis()
        if basis is None:
            return None
        if point.drop_rate == 0.0:
            return 1.0
        zero, base = self.points[0], self.base_point
        if basis == "accuracy gain":
            ab = self.accuracy(base)
            return (self.accuracy(point) - ab) / (self.accuracy(zero) - ab)
        if basis == "accuracy":
            return self.accuracy(point) / self.accuracy(zero)
        loss, loss0 = math.log(point.perplexity), math.log(zero.perplexity)
        if basis == "perplexity gain":
            loss_base = math.log(base.perplexity)
            return (loss_base - loss) / (loss_base - loss0)
        return loss0 / loss if loss > 0 else 1.0

    def breaking_point(self, method: str) -> tuple[float | None, float | None]:
        """(largest drop rate up to which every point keeps ≥ HOLDS of the gain, first rate that
        does not); the second is None when the whole sweep holds."""
        holds = None
        for point in self.series(method):
            kept = self.retained(point)
            if kept is None or kept < HOLDS:
                return holds, point.drop_rate
            holds = point.drop_rate
        return holds, None

    def summary(self) -> list[str]:
        """One sentence per method saying how far it holds and where it breaks."""
        basis = self.basis()
        if basis is None:
            return [("nothing to keep: the fine-tuned model scores no better than 0 on the suite and no text was "
                     "given; sweep on a suite of its skills (--suite) or a text (--text)")]
        reference = "over the base" if "gain" in basis else "relative to the fine-tuned model"
        lines = [f"measured on: {basis} ({reference}); a drop rate holds while it keeps ≥{HOLDS:.0%}."]
        for method in [m for m in METHODS if self.series(m)]:
            holds, breaks = self.breaking_point(method)
            name = METHOD_TITLES[method]
            values = {p.drop_rate: p for p in self.series(method)}
            if breaks is None:
                last = self.series(method)[-1]
                lines.append(f"{name}: holds at every drop rate up to "
                             f"{last.drop_rate:.0%} ({self._describe(last)}).")
            elif not holds:  # nothing holds past the fine-tuned model itself (drop rate 0)
                lines.append(f"{name}: breaks already at a {breaks:.0%} drop ({self._describe(values[breaks])}).")
            else:
                lines.append(f"{name}: holds up to a {holds:.0%} drop ({self._describe(values[holds])}) and breaks at "
                             f"{breaks:.0%} ({self._describe(values[breaks])}).")
        return lines

    def _describe(self, point: SweepPoint) -> str:
        parts = []
        accuracy = self.accuracy(point)
        if accuracy is not None:
            parts.append(f"accuracy {accuracy:.0%}")
        if point.perplexity is not None:
            parts.append(f"perplexity {point.perplexity:.2f}")
        kept = self.retained(point)
        if kept is not None:
            parts.append(f"keeps {kept:.0%}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> SweepResult:
        data = dict(data)
        data["base_point"] = SweepPoint(**data["base_point"])
        data["points"] = [SweepPoint(**p) for p in data["points"]]
        return cls(**data)


def sweep_recipe(base: str, model: str, method: str, drop_rate: float, seed: int = 0) -> dict:
    """The engine recipe of one sweep point: the single model, weight 1, density 1 − drop rate."""
    return {
        "merge_method": METHODS[method],
        "base_model": str(base),
        "models": [{"model": str(model), "parameters": {"weight": 1.0, "density": round(1.0 - drop_rate, 10)}}],
        "seed": seed,
    }


def drop_rates(rates) -> tuple[float, ...]:
    """The drop rates a sweep evaluates: ``rates`` sorted, without repeats, with 0 (the fine-tuned
    model itself) added. Each must lie in [0, 1); raises MergeStudioError naming the first that does not."""
    rates = tuple(sorted({float(r) for r in rates} | {0.0}))
    bad = next((r for r in rates if not 0.0 <= r < 1.0), None)
    if bad is not None:
        raise MergeStudioError(f"drop rate {bad:g} is out of range: drop rates lie in [0, 1) "
                               "(a drop rate of 1 removes the whole task vector)")
    return rates


def _task_subset(suite: str | Path, tasks: list[str], folder: Path) -> Path:
    """A JSONL suite holding only ``tasks`` of ``suite`` (the skills being swept): fewer prompts."""
    path = folder / "sweep-tasks.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for name, examples in load_suite(suite).items():
            if name in tasks:
                for example in examples:
                    out.write(json.dumps({"prompt": example.prompt, "answer": example.answer, "task": name}) + "\n")
    return path


def dare_sweep(
    base: str | Path,
    finetuned: str | Path,
    *,
    rates: tuple[float, ...] = DROP_RATES,
    methods: tuple[str, ...] = ("random", "magnitude"),
    suite: str | Path | None = None,
    text: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    policy: SourcePolicy = SourcePolicy(),
    label: str | None = None,
    workdir: str | Path | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> SweepResult:
    """Evaluate ``finetuned`` with its task vector randomly dropped (and rescaled) or magnitude
    trimmed at each drop rate in ``rates``, and the base for reference.

    ``suite``: a registered suite name (the demo's 'zoo') or a JSONL file of {prompt, answer[, task]}; ``text``: a file to measure
    perplexity on; at least one is needed. Merges go to a temporary folder (under ``workdir``
    if given), one at a time, each deleted after its evaluation. Setting ``cancel`` stops the
    current merge or evaluation with ``merging.errors.Cancelled`` (a merge raises its subclass
    MergeCancelled); once the last point is done the sweep is returned. Raises MergeStudioError.
    """
    if suite is None and text is None:
        raise MergeStudioError("the sweep needs a task suite (a registered name or a JSONL file) or a text file for perplexity")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise MergeStudioError(f"unknown sweep method {unknown[0] if unknown else None!r}; use {', '.join(METHODS)}")
    rates = drop_rates(rates)
    if suite is not None:
        load_suite(suite)  # a bad suite fails now, not after the first merge
    base_folder = resolve_model(str(base), policy).whole_folder()
    model_folder = resolve_model(str(finetuned), policy).whole_folder()
    total = 2 + len(methods) * (len(rates) - 1)
    done = 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    def scored(folder: Path, method: str, rate: float, tasks_suite) -> SweepPoint:
        check_cancel(cancel, "sweep stopped")  # before each merge or evaluation; both also check within themselves
        started = time.perf_counter()
        report = evaluate(folder, suite=tasks_suite, text=text, device=device, cancel=cancel)
        return SweepPoint(method, rate, dict(report.tasks), report.perplexity, round(time.perf_counter() - started, 3))

    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="viz-sweep-", dir=workdir) as tmp:
        base_point = scored(base_folder, "base", 0.0, suite)
        step("base model")
        zero = scored(model_folder, methods[0], 0.0, suite)
        step("fine-tuned model (drop rate 0)")
        tasks = [t for t in zero.tasks if zero.tasks[t] > base_point.tasks.get(t, 0.0)] or list(zero.tasks)
        swept_suite = suite
        if suite is not None and set(tasks) != set(zero.tasks):
            swept_suite = _task_subset(suite, tasks, Path(tmp))
        points = [SweepPoint(m, 0.0, dict(zero.tasks), zero.perplexity, zero.seconds) for m in methods]
        for method in methods:
            for rate in rates[1:]:
                out = Path(tmp) / "merged"
                check_cancel(cancel, "sweep stopped")
                started = time.perf_counter()
                merge(load_recipe(sweep_recipe(str(base), str(finetuned), method, rate, seed)), out,
                      device=device, overwrite=True, policy=policy, cancel=cancel)
                point = scored(out, method, rate, swept_suite)
                point.seconds = round(time.perf_counter() - started, 3)
                points.append(point)
                shutil.rmtree(out, ignore_errors=True)
                step(f"{METHOD_TITLES[method]}, drop rate {rate:.0%}")
    return SweepResult(
        model=label or Path(str(finetuned)).name or str(finetuned), ref=str(finetuned), base=str(base),
        suite=None if suite is None else str(suite), text=None if text is None else str(text), seed=seed,
        tasks=tasks, base_point=base_point, points=points,
    )


__all__ = ["DROP_RATES", "HOLDS", "METHODS", "METHOD_TITLES", "SweepPoint", "SweepResult", "dare_sweep", "drop_rates",
           "sweep_recipe"]
