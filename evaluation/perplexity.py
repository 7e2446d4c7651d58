"""Perplexity of a model on a text."""

from __future__ import annotations

import math

import torch

from evaluation.scoring import STOPPED
from merging.errors import MergeStudioError, check_cancel


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int = 512, cancel=None) -> float:
    """exp(mean next-token negative log-likelihood) over ``text``, in non-overlapping windows;
    a set ``cancel`` event stops between windows (a long text is many of them)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 2:
        raise MergeStudioError("the perplexity text is too short (fewer than 2 tokens)")
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        check_cancel(cancel, STOPPED)
        piece = ids[start : start + window + 1].unsqueeze(0).to(model.device)
        if piece.shape[1] < 2:
            break
        logits = model(piece[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0], piece[0, 1:], reduction="sum")
        total += nll.item()
        count += piece.shape[1] - 1
    return math.exp(total / count)
