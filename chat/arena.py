"""Rounds of the side-by-side chat: which model answers which conversation in which panel.

Openly, each panel's model answers that panel's conversation plus the new message. Blind, an
``ABSession`` draws two of the panels' models and keeps their conversations; its answers go to
the first two panels, named Model A and Model B until the vote. Either way every model is
checked against the visitor's access policy first: the shared pool may read every session's
merges, a visitor only the offered models and their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from chat.ab import ABSession
from chat.generate import SamplingParams
from merging.errors import MergeStudioError
from merging.sources import SourcePolicy, check_local_access

Conversation = list[dict]


@dataclass
class Round:
    """One message answered by several models at once."""

    targets: list[str]  # the model references to load, in answer order
    panels: list[int]  # the panel each answer is shown in
    asked: list[Conversation]  # what each target answers (ending with the user message)
    ab: ABSession | None  # the blind comparison this round belongs to, if any


def open_round(text: str, models: list[str | None], conversations: list[Conversation], ab: ABSession | None,
               params: SamplingParams, policy: SourcePolicy, *, blind: bool, again: bool = False) -> Round:
    """The round for ``text`` (``again``: the last message asked again) over the panels' ``models``.

    Blind: a new ``ABSession`` when there is none or the last one was voted on; its two models
    answer its own conversations. Open: every panel needs a model and answers its conversation.
    """
    for ref in models:
        if ref:
            check_local_access(ref, policy)
    if blind:
        if ab is None or ab.voted:
            ab = ABSession([m for m in models if m])
        asked = ab.regenerate(params) if again else ab.ask(text, params)
        return Round(list(ab.models), [0, 1], [list(conversation) for conversation in asked], ab)
    if not all(models):
        raise MergeStudioError("choose a model for every panel (or show fewer panels)")
    asked = [list(conversations[i]) + [{"role": "user", "content": text}] for i in range(len(models))]
    return Round(list(models), list(range(len(models))), asked, None)


def close_round(round_: Round, answers: list[str], conversations: list[Conversation]) -> list[Conversation]:
    """The panels' conversations with the round's answers (a blind round also records them in
    its ``ABSession``, for the vote)."""
    updated = [list(c) for c in conversations]
    for k, panel in enumerate(round_.panels):
        updated[panel] = round_.asked[k] + [{"role": "assistant", "content": answers[k]}]
        if round_.ab is not None:
            round_.ab.answer("AB"[k], answers[k])
    return updated
