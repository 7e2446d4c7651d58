"""Task suites: named sets of ``{prompt, answer}`` examples, grouped by task.

A suite is a registered name (``register_suite``: the demo family registers ``zoo``, its
held-out questions) or a JSONL file of ``{"prompt", "answer"[, "task"][, "match"]}`` lines.
Evaluation knows no suite by itself: packages that own data register theirs.

An example is scored by exact match (the default), or with ``"match": "contains"`` by whether
the expected answer appears as whole words in the answer's first line: the fair test of a chat
model that answers general questions in a sentence ("The capital of France is Paris.").

A registered suite may name a *general* companion: a suite of things the base model already
knows, and a general text, which measure what a fine-tune or a merge keeps of the base's
general ability (out of distribution) beside what it learned (``evaluate(..., general=True)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from merging.errors import MergeStudioError


MATCHES = ("exact", "contains")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    match: str = "exact"  # one of MATCHES


Suite = dict[str, list[Example]]  # task name -> examples
SuiteLoader = Callable[[], Suite]


@dataclass(frozen=True)
class RegisteredSuite:
    name: str
    description: str
    load: SuiteLoader
    general: str | None = None  # a registered suite of what the base already knows (out of distribution)
    text: Path | None = None  # a general text, for perplexity


_SUITES: dict[str, RegisteredSuite] = {}


def register_suite(name: str, load: SuiteLoader, description: str, *, general: str | None = None,
                   text: Path | None = None) -> None:
    """Offer ``load()`` as the suite called ``name`` (in ``load_suite``, ``--suite`` and the studio);
    ``general`` and ``text``: its general companions (``general_companions``)."""
    _SUITES[name] = RegisteredSuite(name, description, load, general, text)


def general_companions(spec: str | Path | None) -> tuple[str | None, Path | None]:
    """The general suite and text registered with suite ``spec`` ((None, None) for a file or a
    suite without them): what ``evaluate(..., general=True)`` also measures."""
    suite = _SUITES.get(str(spec)) if spec is not None else None
    return (suite.general, suite.text) if suite is not None else (None, None)


def registered_suites() -> dict[str, RegisteredSuite]:
    return dict(_SUITES)


def default_suite() -> str | None:
    """The suite a command line uses when none is named: the first registered one, if any (the
    demo family's ``zoo`` once ``demo`` is imported, as the entry points do)."""
    return next(iter(_SUITES), None)


def load_suite(spec: str | Path) -> Suite:
    """A registered suite by name, else a JSONL file of ``{"prompt", "answer"}`` lines with an
    optional ``"task"`` field to group them (default: the file's name)."""
    if str(spec) in _SUITES:
        return _SUITES[str(spec)].load()
    path = Path(spec)
    if not path.is_file():
        names = ", ".join(repr(n) for n in _SUITES) or "none registered"
        raise MergeStudioError(f"task suite {str(spec)!r} not found: give a JSONL file of {{\"prompt\", \"answer\"}} "
                               f"lines or a suite name ({names})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeStudioError(f"cannot read task suite {path}: {exc}") from None
    suite: Suite = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            example = Example(str(item["prompt"]), str(item["answer"]), str(item.get("match", "exact")))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MergeStudioError(f"{path}, line {number}: expected a JSON object with \"prompt\" and \"answer\"") from None
        if example.match not in MATCHES:
            raise MergeStudioError(f"{path}, line {number}: \"match\" is {example.match!r}; use one of "
                                   + ", ".join(repr(m) for m in MATCHES))
        suite.setdefault(str(item.get("task", path.stem)), []).append(example)
    if not suite:
        raise MergeStudioError(f"task suite {path} has no examples")
    return suite
