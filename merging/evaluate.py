"""Evaluation of any model folder: exact-match accuracy on task prompts, perplexity on text.

Prompts go through the model's own chat template; generation is greedy and batched, so a
score is deterministic. Used by ``python -m merging eval``, the quality benchmark and the app.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging.errors import Cancelled, MergeStudioError
from merging.zoo.tasks import TASKS, Example, normalize

MAX_NEW_TOKENS = 16

# transformers' from_pretrained is not thread-safe: it builds models under a process-wide
# meta-device context, and its lazy module import can fail when two threads touch it first.
# Under load, concurrent loads failed with "Cannot copy out of meta tensor" (bench/load.py), so
# every model load in the process (evaluation, calibration, the chat pool) takes this lock.
MODEL_LOAD_LOCK = threading.RLock()


@dataclass
class EvalReport:
    tasks: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None
    answers: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # (prompt, expected, got)

    def summary(self) -> dict:
        return {"tasks": {k: round(v, 4) for k, v in self.tasks.items()},
                "perplexity": None if self.perplexity is None else round(self.perplexity, 4)}


def load_suite(spec: str | Path) -> dict[str, list[Example]]:
    """``zoo``: the demo family's held-out prompts. Otherwise a JSONL file of ``{"prompt", "answer"}``
    lines, with an optional ``"task"`` field to group them (default: the file's name)."""
    if str(spec) == "zoo":
        return {name: task.eval_examples() for name, task in TASKS.items()}
    path = Path(spec)
    suite: dict[str, list[Example]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeStudioError(f"cannot read task suite {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            example = Example(str(item["prompt"]), str(item["answer"]))
        except (ValueError, KeyError, TypeError):
            raise MergeStudioError(f"{path}, line {number}: expected a JSON object with \"prompt\" and \"answer\"") from None
        suite.setdefault(str(item.get("task", path.stem)), []).append(example)
    if not suite:
        raise MergeStudioError(f"task suite {path} has no examples")
    return suite


def load_model(folder: Path, device: str = "auto"):
    """A model folder loaded for inference in float32 (never with remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from merging.engine import pick_device

    hf_logging.disable_progress_bar()  # a bar per load clutters the CLI's and the app's own progress
    target = pick_device(device)
    try:
        with MODEL_LOAD_LOCK:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(target).eval()
    except (OSError, ValueError) as exc:
        raise MergeStudioError(f"cannot load model {folder}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
                     on_batch=None, cancel=None) -> list[str]:
    """Greedy answers to single-turn chat prompts, in order.

    ``on_batch(answered)`` is called after each batch; a set ``cancel`` event stops between batches.
    """
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluation stopped")
        chats = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts[start : start + batch_size]
        ]
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if on_batch is not None:
            on_batch(len(answers))
    return answers


def task_accuracy(model, tokenizer, examples: list[Example], on_batch=None, cancel=None) -> tuple[float, list[tuple[str, str, str]]]:
    """Fraction of prompts whose normalized answer equals the expected one exactly."""
    got = generate_answers(model, tokenizer, [ex.prompt for ex in examples], on_batch=on_batch, cancel=cancel)
    details = [(ex.prompt, ex.answer, answer) for ex, answer in zip(examples, got)]
    correct = sum(normalize(answer) == normalize(ex.answer) for ex, answer in zip(examples, got))
    return correct / len(examples), details


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int = 512, cancel=None) -> float:
    """exp(mean next-token negative log-likelihood) over ``text``, in non-overlapping windows;
    a set ``cancel`` event stops between windows (a long text is many of them)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 2:
        raise MergeStudioError("the perplexity text is too short (fewer than 2 tokens)")
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluation stopped")
        piece = ids[start : start + window + 1].unsqueeze(0).to(model.device)
        if piece.shape[1] < 2:
            break
        logits = model(piece[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0], piece[0, 1:], reduction="sum")
        total += nll.item()
        count += piece.shape[1] - 1
    return math.exp(total / count)


def evaluate(folder: str | Path, suite: str | Path | None = "zoo", text: str | Path | None = None, device: str = "auto",
             *, progress=None, cancel=None) -> EvalReport:
    """Accuracy on each task of ``suite`` and, if ``text`` (a file) is given, perplexity on it.

    ``progress(done, total)`` counts answered prompts; a set ``cancel`` event raises
    ``Cancelled`` at the next batch of prompts or window of text, or before the model loads.
    """
    suites = load_suite(suite) if suite is not None else {}  # a bad suite fails before the model loads
    if cancel is not None and cancel.is_set():
        raise Cancelled("evaluation stopped")
    model, tokenizer = load_model(Path(folder), device)
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
