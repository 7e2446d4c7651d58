"""Evaluation of any model folder: exact-match accuracy on task suites, perplexity on text.

    from evaluation import evaluate
    report = evaluate("out/merged", suite="tasks.jsonl", text="corpus.txt")
    report.summary()  # {"tasks": {name: accuracy}, "perplexity": ...}

Suites are JSONL files or names registered with ``register_suite`` (the demo family registers
``zoo``); evaluation itself knows no demo. Used by ``python -m merging eval``, the DARE sweep,
the quality benchmark and the studio.
"""

from evaluation.perplexity import perplexity
from evaluation.run import EvalReport, evaluate
from evaluation.scoring import generate_answers, normalize, task_accuracy
from evaluation.suites import Example, default_suite, load_suite, register_suite, registered_suites

__all__ = ["EvalReport", "Example", "default_suite", "evaluate", "generate_answers", "load_suite", "normalize", "perplexity",
           "register_suite", "registered_suites", "task_accuracy"]
