"""Evaluate a model folder: accuracy on each task of a suite, and perplexity on a text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from evaluation.perplexity import perplexity
from evaluation.scoring import STOPPED, task_accuracy
from evaluation.suites import general_companions, load_suite
from merging.endpoints import is_endpoint, parse_endpoint
from merging.errors import MergeStudioError, check_cancel
from merging.runtime import load_model


@dataclass
class EvalReport:
    tasks: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None
    # (prompt, expected, got) per task; a general task's under "general: <task>"
    answers: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    general: dict[str, float] = field(default_factory=dict)  # the suite's general companion's tasks (out of distribution)

    def summary(self) -> dict:
        summary = {"tasks": {k: round(v, 4) for k, v in self.tasks.items()},
                   "perplexity": None if self.perplexity is None else round(self.perplexity, 4)}
        if self.general:
            summary["general"] = {k: round(v, 4) for k, v in self.general.items()}
        return summary


def evaluate(folder: str | Path, suite: str | Path | None = None, text: str | Path | None = None, device: str = "auto",
             *, general: bool = False, allow_pickle: bool = False, progress=None, cancel=None) -> EvalReport:
    """Accuracy on each task of ``suite`` (a registered name or a JSONL file; None: no tasks) and,
    if ``text`` (a file) is given, perplexity on it. ``folder`` may be an endpoint reference
    (``openai:<base URL>#<model>``, ``merging.endpoints``): its server answers the same prompts.

    ``general``: also measure what the model kept of the base's general ability, with the suite's
    registered companions (``general_companions``): the general suite's tasks in ``report.general``
    and, when no ``text`` is given, perplexity on the general text (not for a served model).

    ``progress(done, total)`` counts answered prompts; a set ``cancel`` event raises
    ``Cancelled`` at the next batch of prompts or window of text, or before the model loads.
    """
    suites = load_suite(suite) if suite is not None else {}  # a bad suite fails before the model loads
    general_suite, general_text = general_companions(suite) if general else (None, None)
    general_tasks = load_suite(general_suite) if general_suite is not None else {}
    if text is None and not is_endpoint(str(folder)):
        text = general_text
    check_cancel(cancel, STOPPED)
    if is_endpoint(str(folder)):
        if text is not None:
            raise MergeStudioError("perplexity needs the model's weights, and a served model gives answers only: "
                                   "measure perplexity on its folder")
        model, tokenizer = parse_endpoint(str(folder)), None
    else:
        model, tokenizer = load_model(Path(folder), device=device, allow_pickle=allow_pickle, purpose="evaluation")
    report = EvalReport()
    total = sum(len(examples) for examples in [*suites.values(), *general_tasks.values()])
    answered = 0
    for scores, tasks, prefix in ((report.tasks, suites, ""), (report.general, general_tasks, "general: ")):
        for name, examples in tasks.items():
            def on_batch(count: int, before: int = answered) -> None:
                if progress is not None:
                    progress(before + count, total)

            scores[name], report.answers[prefix + name] = task_accuracy(model, tokenizer, examples, on_batch, cancel)
            answered += len(examples)
    if text is not None:
        try:
            content = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MergeStudioError(f"cannot read text file {text}: {exc}") from None
        report.perplexity = perplexity(model, tokenizer, content, cancel=cancel)
    return report
