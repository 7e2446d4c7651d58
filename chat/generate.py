"""Streaming chat generation: one model, or several side by side on the same prompt.

Generation is a manual token loop over the model's KV cache rather than ``model.generate``
with a streamer thread, because:

- Stop is checked before every forward pass, so it takes effect within one token, with no
  thread to join; the KV cache is a local of the generator and is freed with it.
- Sampling draws from a private ``torch.Generator`` seeded per stream, on the CPU, so a seed
  gives the same text whatever other users generate at the same time, and the same random
  draws on any device (the logits themselves differ a little between a CPU's float32 and a
  GPU's bfloat16). (``generate`` draws from torch's global RNG, which concurrent users share.)
- Several models advance together in one thread, one token each in turn (``stream_many``),
  without the threads, queues and oversubscribed cores of one streamer thread per model.

Decoding: temperature 0 is greedy (argmax, as ``generate(do_sample=False)``); otherwise
logits / temperature, then nucleus filtering (the smallest set of tokens whose probability
reaches ``top_p``), then one draw, as transformers' warpers do. Other generation-config
settings (repetition penalty, top-k) are not applied, so every panel decodes alike.

Prompts go through each model's own chat template; a tokenizer without one (a base model)
gets a plain ``User: ... / Assistant:`` transcript (``merging.prompts``), and generation also
stops where the model starts writing the next ``User:`` turn itself.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch

from chat.pool import ModelHandle, ModelPool, default_pool
from merging.endpoints import Background, Endpoint, idle_wait
from merging.errors import MergeStudioError
from merging.prompts import encode as encode_prompt
from merging.prompts import render

MAX_MESSAGE_CHARS = 4000  # one chat input
MAX_PROMPT_TOKENS = 4096  # the whole templated conversation
MAX_NEW_TOKENS = 2048
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
ROLES = ("system", "user", "assistant")

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def _number(name: str, value, *, integer: bool = False) -> float | int:
    """``value`` as a finite number (ints accepted for floats, integral floats for ints), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeStudioError(f"{name} must be a number, got {value!r}")
    if integer:
        if value != int(value):
            raise MergeStudioError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How every panel decodes; the same params and seed give the same text, so A/B runs compare.

    ``temperature`` in [0, 2] (0: greedy), ``top_p`` in (0, 1], ``max_new_tokens`` in
    [1, 2048], ``seed`` in [0, 2**63 - 1]. Out-of-range values raise ``MergeStudioError``
    naming the field and its range.
    """

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        checks = {
            "temperature": (_number("temperature", self.temperature), 0.0, MAX_TEMPERATURE, "0 (greedy) to 2"),
            "top_p": (_number("top_p", self.top_p), 0.0, 1.0, "above 0, at most 1"),
            "max_new_tokens": (_number("max_new_tokens", self.max_new_tokens, integer=True), 1, MAX_NEW_TOKENS, f"1 to {MAX_NEW_TOKENS}"),
            "seed": (_number("seed", self.seed, integer=True), 0, MAX_SEED, "0 to 2**63 - 1"),
        }
        for name, (value, low, high, words) in checks.items():
            below = value <= low if name == "top_p" else value < low
            if below or value > high:
                raise MergeStudioError(f"{name} must be {words}, got {value}")
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_message(text, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """A chat input, refused with a message when it is not text, empty, or longer than ``max_chars``."""
    if not isinstance(text, str):
        raise MergeStudioError(f"a chat message must be text, got {type(text).__name__}")
    if not text.strip():
        raise MergeStudioError("the message is empty; type something to send")
    if len(text) > max_chars:
        raise MergeStudioError(f"the message is {len(text):,} characters long; the limit is {max_chars:,}: shorten it")
    return text


def check_messages(messages: Sequence[Message], max_chars: int = MAX_MESSAGE_CHARS) -> list[Message]:
    """A conversation ending with a user turn, each message a {role, content} dict of text."""
    if not messages:
        raise MergeStudioError("the conversation is empty; type a message to send")
    checked = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise MergeStudioError(
                f"message {number} of the conversation is not a {{'role': one of {', '.join(ROLES)}, 'content': text}} dict"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "user":
        raise MergeStudioError("the conversation must end with a user message to answer")
    check_message(checked[-1]["content"], max_chars)
    return checked


render_prompt = render  # the conversation as the model reads it (``merging.prompts``), for this package's users


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) if getattr(model, "generation_config", None) else None
    found = set(ids if isinstance(ids, (list, tuple)) else [ids])
    found.add(tokenizer.eos_token_id)
    return {i for i in found if i is not None}


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class _Detokenizer:
    """Generated ids -> text deltas, holding back what may still change.

    Held back: a trailing incomplete UTF-8 character (decoded as U+FFFD) and a tail that could be
    the start of a stop string. The whole generation is decoded each time (cheap next to a
    forward pass), so merges across token boundaries come out as the full decode has them.
    """

    def __init__(self, tokenizer, lock: threading.Lock, stop_strings: tuple[str, ...], strip_leading: bool):
        self.tokenizer, self.lock, self.stop_strings = tokenizer, lock, stop_strings
        self.strip_leading = strip_leading  # a transcript's "Assistant:" is followed by a space
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string appeared: the answer ends before it

    def _decode(self) -> str:
        with self.lock:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.strip_leading:
            text = text.lstrip()
        for stop in self.stop_strings:
            if stop in text:
                text, self.stopped = text[: text.index(stop)], True
        return text

    def _delta(self, text: str) -> str:
        if not text.startswith(self.emitted):  # decoding is not prefix-stable here; wait for it to settle
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode()
        if self.stopped:
            return self._delta(text)
        safe = text.rstrip("\ufffd")
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(safe)), 0, -1):
                if safe.endswith(stop[:size]):
                    safe = safe[:-size]
                    break
        return self._delta(safe)

    def finish(self) -> str:
        return self._delta(self._decode())


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy, or temperature + top-p sampling with ``generator`` (drawn on the CPU)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[before >= params.top_p] = 0.0  # the top token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Stream:
    """One conversation prepared for one model: validated, rendered, encoded, within limits."""

    def __init__(self, handle: ModelHandle, messages: Sequence[Message], params: SamplingParams,
                 stop_event: threading.Event | None, max_prompt_tokens: int, label: str = "this model"):
        if not isinstance(params, SamplingParams):
            raise MergeStudioError("params must be a SamplingParams")
        self.handle, self.params = handle, params
        self.stop_event = stop_event or threading.Event()
        self.model, tokenizer = handle.model, handle.tokenizer
        prompt = render(tokenizer, check_messages(messages))
        with handle.tokenizer_lock:
            ids = encode_prompt(tokenizer, prompt)
        context = _context_length(self.model)
        limit = min(max_prompt_tokens, context - 1) if context else max_prompt_tokens
        if len(ids) > limit:
            raise MergeStudioError(
                f"the conversation is {len(ids):,} tokens; {label} takes at most {limit:,}: "
                "clear the chat or send a shorter message"
            )
        # A model with a short context gets fewer new tokens rather than a refusal.
        self.max_new_tokens = min(params.max_new_tokens, context - len(ids)) if context else params.max_new_tokens
        self.prompt_ids = torch.tensor([ids], dtype=torch.long)
        self.detokenizer = _Detokenizer(tokenizer, handle.tokenizer_lock, prompt.stop_strings, not prompt.templated)
        self.eos_ids = _eos_ids(self.model, tokenizer)
        self.tokens = 0  # generated so far

    def steps(self) -> Iterator[str]:
        """One text delta (possibly empty) per generated token, until EOS, a stop string, the token limit or Stop."""
        params = self.params
        generator = torch.Generator().manual_seed(params.seed)
        run = self.handle.decoder.run(self.prompt_ids.shape[1] + self.max_new_tokens)
        token = None
        try:
            while self.tokens < self.max_new_tokens and not self.stop_event.is_set():
                logits = run.prefill(self.prompt_ids) if token is None else run.step(token)
                token = next_token(logits, params, generator)
                if token in self.eos_ids:
                    break
                self.tokens += 1
                yield self.detokenizer.push(token)
                if self.detokenizer.stopped:
                    return
            yield self.detokenizer.finish()
        finally:
            run.close()  # the KV cache goes now (or its static slot is reset), also when the consumer stops early


def stream(handle: ModelHandle, messages: Sequence[Message], params: SamplingParams,
           stop_event: threading.Event | None = None, *, max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> Iterator[str]:
    """Text chunks of the model's answer to ``messages``, as they are generated.

    ``"".join(chunks)`` is the answer. Input is checked now (not at the first ``next``):
    malformed messages, a last message over ``MAX_MESSAGE_CHARS`` or a templated conversation
    over ``max_prompt_tokens`` (or the model's context) raise ``MergeStudioError``. Setting
    ``stop_event`` ends the stream before the next token; closing the iterator also ends it.
    The caller keeps the lease on ``handle`` for as long as it iterates.
    """
    steps = _Stream(handle, messages, params, stop_event, max_prompt_tokens).steps()
    return (chunk for chunk in steps if chunk)


def stream_many(handles: Sequence[ModelHandle | Endpoint], conversations: Sequence[Sequence[Message]],
                params: SamplingParams, stop_event: threading.Event | None = None, *,
                max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> Iterator[tuple[int, str]]:
    """``(panel index, text so far)`` updates for several models answering at once.

    The panels advance round-robin in the calling thread, one token per model in turn, so
    they grow together and each panel's text is exactly what ``stream`` alone gives with the
    same params (each has its own seeded generator). The cost: the models run one after the
    other, so on a CPU every panel gets about 1/N of the tokens per second of one model
    alone; the total is the same as running them in sequence, while threads would only
    fight over the same cores. Every conversation is checked before any model runs. One
    ``stop_event`` stops them all. A panel may be an ``Endpoint`` (``merging.endpoints``): its
    answer streams from its server on a thread of its own, read without waiting, and a failure
    there ends that panel with its message while the others go on.
    """
    if len(handles) != len(conversations):
        raise MergeStudioError(f"{len(handles)} models but {len(conversations)} conversations; give one conversation per panel")
    # Errors name the panel, never the model: in a blind A/B the user must not learn it that way.
    streams = [Background(h, check_messages(c), params, stop_event) if isinstance(h, Endpoint)
               else _Stream(h, c, params, stop_event, max_prompt_tokens, f"the model in panel {i + 1}")
               for i, (h, c) in enumerate(zip(handles, conversations))]
    return _round_robin([s.steps() for s in streams])


def _round_robin(steps: list[Iterator[str]]) -> Iterator[tuple[int, str]]:
    texts = [""] * len(steps)
    active = dict(enumerate(steps))
    try:
        while active:
            news = False
            for index, panel in list(active.items()):
                try:
                    delta = next(panel)
                except StopIteration:
                    del active[index]
                    continue
                if delta:
                    news = True
                    texts[index] += delta
                    yield index, texts[index]
            if not news and active:  # only endpoints waiting on their servers
                idle_wait()
    finally:
        for panel in active.values():
            panel.close()


def generate(model: str, prompt: str, temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 256,
             seed: int = 0, *, pool: ModelPool | None = None, stop_event: threading.Event | None = None) -> Iterator[str]:
    """Streamed answer (text chunks) of ``model`` to a single-turn ``prompt``.

    ``model`` is a reference as in recipes (local folder, Hub id) or the output folder of a
    merge; it is leased from ``pool`` (default: the process-wide ``default_pool()``) when
    this is called, and released when the stream ends or is closed.
    """
    params = SamplingParams(temperature, top_p, max_new_tokens, seed)
    check_message(prompt)
    handle = (pool or default_pool()).get(model)
    try:
        chunks = stream(handle, [{"role": "user", "content": prompt}], params, stop_event)
    except BaseException:
        handle.release()
        raise
    return _releasing(chunks, handle)


def _releasing(chunks: Iterator[str], handle: ModelHandle) -> Iterator[str]:
    try:
        yield from chunks
    finally:
        handle.release()
