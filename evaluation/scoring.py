"""Exact-match accuracy: greedy, batched answers to single-turn prompts, normalized and compared.

Prompts go through the model's chat template, or, for a model without one, as a plain
``User: / Assistant:`` transcript that it continues (``merging.prompts``), so base models are
scored too. Generation is greedy, so a score is deterministic.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import torch

from evaluation.suites import Example
from merging.endpoints import Endpoint, stream_endpoint
from merging.errors import check_cancel
from merging.prompts import cut_at_stop, render

MAX_NEW_TOKENS = 16
STOPPED = "evaluation stopped"


def normalize(text: str) -> str:
    """Exact-match normalization: first line, lowercase, no surrounding spaces, quotes or final period."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.strip().strip("\"'`").rstrip(".!").strip().lower()


def is_correct(answer: str, example: Example) -> bool:
    """Exact match after ``normalize``; for a ``contains`` example, the normalized expected answer
    as whole words anywhere in the normalized answer (its first line)."""
    expected, got = normalize(example.answer), normalize(answer)
    if example.match == "contains":
        return bool(expected) and re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", got) is not None
    return got == expected


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
                     on_batch=None, cancel=None) -> list[str]:
    """Greedy answers to single-turn prompts, in order.

    ``on_batch(answered)`` is called after each batch; a set ``cancel`` event stops between batches.
    """
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        check_cancel(cancel, STOPPED)
        rendered = [render(tokenizer, [{"role": "user", "content": p}]) for p in prompts[start : start + batch_size]]
        batch = tokenizer([r.text for r in rendered], return_tensors="pt", padding=True,
                          add_special_tokens=rendered[0].add_special_tokens).to(model.device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers += [cut_at_stop(text, prompt) for text, prompt in zip(texts, rendered)]
        if on_batch is not None:
            on_batch(len(answers))
    return answers


def endpoint_answers(endpoint, prompts: list[str], on_batch=None, cancel=None, workers: int = 4,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers from a served model (``merging.endpoints``), a few requests at a time (engines
    batch them); the same prompts, token limit and greedy decoding as ``generate_answers``."""
    def ask(prompt: str) -> str:
        check_cancel(cancel, STOPPED)
        return "".join(stream_endpoint(endpoint, [{"role": "user", "content": prompt}], temperature=0.0, top_p=1.0,
                                       max_new_tokens=max_new_tokens, seed=0, stop_events=(cancel,)))

    answers: list[str] = []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(prompts), workers * 4):
            check_cancel(cancel, STOPPED)
            answers += list(pool.map(ask, prompts[start: start + workers * 4]))
            if on_batch is not None:
                on_batch(len(answers))
    return answers


def task_accuracy(model, tokenizer, examples: list[Example], on_batch=None, cancel=None) -> tuple[float, list[tuple[str, str, str]]]:
    """Fraction of prompts whose normalized answer equals the expected one exactly, and the
    (prompt, expected, answer) of each. ``model`` may be an ``Endpoint`` (``tokenizer`` None): its
    server answers."""
    prompts = [ex.prompt for ex in examples]
    got = (endpoint_answers(model, prompts, on_batch, cancel) if isinstance(model, Endpoint)
           else generate_answers(model, tokenizer, prompts, on_batch=on_batch, cancel=cancel))
    details = [(ex.prompt, ex.answer, answer) for ex, answer in zip(examples, got)]
    correct = sum(is_correct(answer, ex) for ex, answer in zip(examples, got))
    return correct / len(examples), details
