"""Blind A/B comparison: two models answer the same messages, the user votes, then sees which was which.

A session draws two distinct models from the candidates and their A/B order with its own
seeded ``random.Random``, so neither the position on screen nor the order in the picker
tells which is which. ``models`` is for the server, which must load them; the user sees
``names()``, which stay "Model A" / "Model B" until the vote. ``vote`` appends one JSON line
to the votes file (both model references, which one was A, the choice, both conversations
and the sampling params of every turn) and then reveals the models.

The votes file is append-only JSONL; each vote is written with one ``write`` on an
``O_APPEND`` descriptor under an exclusive ``flock``, so votes from several threads or
processes never interleave. Nothing else is stored: no user name, no token, no environment,
and Hugging Face tokens pasted into a chat are redacted.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from chat.generate import SamplingParams, check_message
from merging.errors import MergeStudioError, redact
from merging.runtime import cache_root

try:
    import fcntl
except ImportError:  # Windows: O_APPEND single writes still keep lines whole in practice
    fcntl = None

VOTE_CHOICES = ("A", "B", "tie", "both_bad")
LABELS = ("A", "B")
VOTES_ENV = "MERGE_STUDIO_VOTES"


def default_votes_path() -> Path:
    """``$MERGE_STUDIO_VOTES``, else ``votes.jsonl`` in the Merge Studio cache."""
    return Path(os.environ.get(VOTES_ENV) or cache_root() / "votes.jsonl").expanduser()


def append_jsonl(path: Path, record: dict) -> None:
    """Append ``record`` as one line, atomically with respect to other writers of ``path``."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # votes hold users' chats
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:  # a regular file takes it in one write; loop in case it does not
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)  # also releases the lock
    except OSError as exc:
        raise MergeStudioError(f"cannot record the vote in {path}: {exc.strerror or exc}") from None


def read_votes(path: Path | str | None = None) -> list[dict]:
    """Every vote recorded in ``path`` (default ``default_votes_path()``), oldest first."""
    path = Path(path) if path is not None else default_votes_path()
    if not path.is_file():
        return []
    votes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            votes.append(json.loads(line))
        except ValueError:
            raise MergeStudioError(f"{path}, line {number}: not a JSON vote record") from None
    return votes


def without_last_turn(conversation: list[dict]) -> list[dict]:
    """``conversation`` without its last user message and the answer to it, if any (to ask again)."""
    kept = list(conversation)
    if kept and kept[-1]["role"] == "assistant":
        kept.pop()
    if kept and kept[-1]["role"] == "user":
        kept.pop()
    return kept


class ABSession:
    """One blind comparison between two of ``candidates`` (model references).

    ``seed``: fixes which two models and which is A (default: a fresh random seed).
    ``votes_path``: where ``vote`` appends (default ``default_votes_path()``).
    Usage: ``a, b = session.ask(text, params)``; stream both (``models`` gives the refs to
    load); ``session.answer("A", text_a)``, ``session.answer("B", text_b)``; repeat; then
    ``session.vote("A" | "B" | "tie" | "both_bad")``, which returns ``{"A": ref, "B": ref}``.
    """

    def __init__(self, candidates: Sequence[str], votes_path: Path | str | None = None, seed: int | None = None):
        distinct = list(dict.fromkeys(str(c) for c in candidates))
        if len(distinct) < 2:
            raise MergeStudioError("a blind A/B comparison needs at least two different models")
        self.seed = secrets.randbits(63) if seed is None else seed
        first, second = random.Random(self.seed).sample(distinct, 2)  # which two, and in which order
        self._models = {"A": first, "B": second}
        self.votes_path = Path(votes_path).expanduser() if votes_path is not None else default_votes_path()
        self.id = uuid.uuid4().hex
        self.conversations: dict[str, list[dict]] = {"A": [], "B": []}
        self.sampling: list[dict] = []  # the params of each user turn
        self.choice: str | None = None

    @property
    def models(self) -> tuple[str, str]:
        """(model A, model B): for the server to load. Never show them before ``voted``."""
        return self._models["A"], self._models["B"]

    @property
    def voted(self) -> bool:
        return self.choice is not None

    def names(self) -> tuple[str, str]:
        """What the panels are called: "Model A" / "Model B" until the vote, then the references."""
        return self.models if self.voted else ("Model A", "Model B")

    def reveal(self) -> dict[str, str]:
        """{"A": ref, "B": ref}, once the user has voted."""
        if not self.voted:
            raise MergeStudioError("the models are revealed after your vote")
        return dict(self._models)

    def _open(self) -> None:
        if self.voted:
            raise MergeStudioError("this comparison is over (you voted); start a new one")

    def ask(self, text: str, params: SamplingParams) -> tuple[list[dict], list[dict]]:
        """Add the user's message to both conversations; returns them (copies) to stream.

        A previous message that did not get both answers (a generation failed) is replaced,
        so the two conversations always hold the same user turns.
        """
        self._open()
        check_message(text)
        if not isinstance(params, SamplingParams):
            raise MergeStudioError("params must be a SamplingParams")
        self._drop_unanswered_turn()
        for conversation in self.conversations.values():
            conversation.append({"role": "user", "content": text})
        self.sampling.append(params.to_dict())
        return self.pending()

    def _drop_last_turn(self) -> None:
        for label, conversation in self.conversations.items():
            self.conversations[label] = without_last_turn(conversation)
        self.sampling.pop()

    def _drop_unanswered_turn(self) -> None:
        if any(c and c[-1]["role"] == "user" for c in self.conversations.values()):
            self._drop_last_turn()

    def regenerate(self, params: SamplingParams) -> tuple[list[dict], list[dict]]:
        """Drop the last answers and ask the last message again (with ``params``)."""
        self._open()
        if not self.sampling:
            raise MergeStudioError("nothing to regenerate yet; send a message first")
        text = next(m["content"] for m in reversed(self.conversations["A"]) if m["role"] == "user")
        self._drop_last_turn()
        return self.ask(text, params)

    def pending(self) -> tuple[list[dict], list[dict]]:
        """Copies of both conversations, as the models should see them now."""
        return tuple([dict(m) for m in self.conversations[label]] for label in LABELS)

    def answer(self, label: str, text: str) -> None:
        """Record model ``label``'s answer (possibly cut short by Stop) to the last message."""
        self._open()
        if label not in LABELS:
            raise MergeStudioError(f"label must be 'A' or 'B', got {label!r}")
        conversation = self.conversations[label]
        if not conversation or conversation[-1]["role"] != "user":
            raise MergeStudioError(f"model {label} has no message to answer")
        conversation.append({"role": "assistant", "content": str(text)})

    def vote(self, choice: str) -> dict[str, str]:
        """Record ``choice`` ("A", "B", "tie" or "both_bad") in the votes file; returns the reveal."""
        self._open()
        if choice not in VOTE_CHOICES:
            raise MergeStudioError(f"vote must be one of {', '.join(VOTE_CHOICES)}; got {choice!r}")
        if not all(c and c[-1]["role"] == "assistant" for c in self.conversations.values()):
            # No first turn yet, or the last message is still being answered (or its answer failed):
            # a vote now would record, and judge, a conversation the user has not seen answered.
            raise MergeStudioError("both models must answer your last message before you vote; wait for them, "
                                   "or send it again")
        winner = self._models.get(choice)  # None for tie and both_bad
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "session": self.id,
            "model_a": self._models["A"],
            "model_b": self._models["B"],
            "choice": choice,
            "winner": winner,
            "conversation_a": self._redacted("A"),
            "conversation_b": self._redacted("B"),
            "sampling": list(self.sampling),
        }
        append_jsonl(self.votes_path, record)
        self.choice = choice
        return self.reveal()

    def _redacted(self, label: str) -> list[dict]:
        return [{"role": m["role"], "content": redact(m["content"])} for m in self.conversations[label]]
