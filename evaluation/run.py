"""Evaluate a model folder: accuracy on each task of a suite, and perplexity on a text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from evaluation.perplexity import perplexity
from evaluation.scoring import STOPPED, task_accuracy
from evaluation.suites import load_suite
from merging.endpoints import is_endpoint, parse_endpoint
from merging.errors import MergeStudioError, check_cancel
from merging.runtime import load_model


@dataclass
class EvalReport:
    tasks: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None
    answers: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # (prompt, expected, got)

    def summary(self) -> dict:
        return {"tasks": {k: round(v, 4) for k, v in self.tasks.items()},
                "perplexity": None if self.perplexity is None else round(self.perplexity, 4)}


def evaluate(folder: str | Path, suite: str | Path | None = None, text: str | Path | None = None, device: str = "auto",
             *, allow_pickle: bool = False, progress=None, cancel=None) -> EvalReport:
    """Accuracy on each task of ``suite`` (a registered name or a JSONL file; None: no tasks) and,
    if ``text`` (a file) is given, perplexity on it. ``folder`` may be an endpoint reference
    (``openai:<base URL>#<model>``, ``merging.endpoints``): its server answers the same prompts.

    ``progress(done, total)`` counts answered prompts; a set ``cancel`` event raises
    ``Cancelled`` at the next batch of prompts or window of text, or before the model loads.
    """
    suites = load_suite(suite) if suite is not None else {}  # a bad suite fails before the model loads
    check_cancel(cancel, STOPPED)
    if is_endpoint(str(folder)):
        if text is not None:
            raise MergeStudioError("perplexity needs the model's weights, and a served model gives answers only: "
                                   "measure perplexity on its folder")
        model, tokenizer = parse_endpoint(str(folder)), None
    else:
        model, tokenizer = load_model(Path(folder), device=device, allow_pickle=allow_pickle, purpose="evaluation")
    report = EvalReport()
    total = sum(len(examples) for examples in suites.values())
    answered = 0
    for name, examples in suites.items():
        def on_batch(count: int, before: int = answered) -> None:
            if progress is not None:
                progress(before + count, total)

        report.tasks[name], report.answers[name] = task_accuracy(model, tokenizer, examples, on_batch, cancel)
        answered += len(examples)
    if text is not None:
        try:
            content = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MergeStudioError(f"cannot read text file {text}: {exc}") from None
        report.perplexity = perplexity(model, tokenizer, content, cancel=cancel)
    return report
