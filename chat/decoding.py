"""How one loaded model decodes: a growing KV cache, or a static one with a compiled step.

Each generation is a ``DecodeRun``: ``prefill(prompt_ids)`` then ``step(token)`` per new token,
each returning the float32 logits of the last position; ``close()`` frees what it holds.

- ``dynamic``: transformers' ``DynamicCache``, grown by each step. Nothing to prepare, no
  compilation: the CPU default, where a compiled step brings little and compiling a model
  takes most of a minute.
- ``static``: a ``StaticCache`` of fixed length, written in place. The same tokens as
  ``dynamic`` (the tests check it); on its own it only saves the cache's re-allocations.
- ``compiled``: ``static`` plus the one-token step through ``torch.compile`` (transformers'
  ``get_compiled_call``: inductor, CUDA graphs on a GPU). Fixed shapes make every step the same
  graph, which turns a small model's decoding on a GPU from launch-bound Python into a replayed
  graph. The CUDA default. ``warm_up`` compiles it when the model is loaded, so no user waits
  for the compilation (on an H100 about 40 s for a 135M Llama, per the issue).

Static caches are kept in a few *slots* per model (``max_slots``), reset and reused rather
than re-allocated, because a compiled step is specialized to its cache's tensors. Every step
attends over the whole slot (the unused tail masked), so slots are short: 1,024 tokens, a
prompt and answer of most chats. With 4,096-token slots the demo base decoded on this CPU at
0.62x ``generate``'s speed, with 1,024 at 0.94x (``bench/chat_speed.py --decoding compiled``).
A run that finds every slot busy, or a conversation longer than a slot, decodes with a dynamic
cache instead: slower, never blocked. Slots are allocated on first use and stay with
the loaded model; they are outside the pool's budget (2 x layers x KV heads x head size x
``cache_tokens`` values each).

The mode comes from ``$MERGE_STUDIO_CHAT_DECODING`` (auto, dynamic, static or compiled) or the
pool's ``decoding=``; auto is compiled on CUDA and dynamic elsewhere.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading

import torch

from merging.errors import MergeStudioError

log = logging.getLogger("merge_studio.chat")

DECODING_ENV = "MERGE_STUDIO_CHAT_DECODING"
MODES = ("auto", "dynamic", "static", "compiled")
DEFAULT_CACHE_TOKENS = 1024  # per static slot: longer conversations decode with a dynamic cache
DEFAULT_SLOTS = 4  # static caches per model: concurrent generations beyond this decode dynamically


def decoding_mode(mode: str | None, device: torch.device) -> str:
    """The mode to use: ``mode``, else ``$MERGE_STUDIO_CHAT_DECODING``, else auto; auto resolved for ``device``."""
    chosen = (mode or os.environ.get(DECODING_ENV) or "auto").strip().lower()
    if chosen not in MODES:
        source = f"${DECODING_ENV}" if not mode else "decoding"
        raise MergeStudioError(f"{source} {chosen!r} is not one of {', '.join(MODES)}")
    if chosen == "auto":
        return "compiled" if device.type == "cuda" else "dynamic"
    return chosen


class Decoder:
    """Decoding runs for one loaded model (shared by every stream on it; thread-safe)."""

    def __init__(self, model: torch.nn.Module, mode: str = "dynamic", *, cache_tokens: int = DEFAULT_CACHE_TOKENS,
                 max_slots: int = DEFAULT_SLOTS):
        if mode not in MODES[1:]:
            raise MergeStudioError(f"decoding mode must be one of {', '.join(MODES[1:])}, got {mode!r}")
        self.model, self.mode = model, mode
        context = getattr(model.config, "max_position_embeddings", None)
        self.cache_tokens = min(cache_tokens, context) if context else cache_tokens
        self.max_slots = max_slots
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._lock = threading.Lock()
        self._free_slots: list = []
        self._slots = 0
        self._step = model.get_compiled_call(None) if mode == "compiled" else model
        self.fallbacks = 0  # runs that decoded dynamically because no slot was free or long enough

    def run(self, total_tokens: int) -> DecodeRun:
        """A run for a prompt plus new tokens of ``total_tokens`` at most."""
        if self.mode == "dynamic" or total_tokens > self.cache_tokens:
            if self.mode != "dynamic":
                self.fallbacks += 1
            return DecodeRun(self, None)
        slot = self._take_slot()
        if slot is None:
            self.fallbacks += 1
        return DecodeRun(self, slot)

    def warm_up(self, token_id: int = 0) -> None:
        """Compile (``compiled``) and allocate one slot now, with a few steps on a dummy prompt."""
        if self.mode == "dynamic":
            return
        with self.run(8) as run:
            logits = run.prefill(torch.full((1, 4), token_id, dtype=torch.long))
            for _ in range(3):  # the first compiled calls record; later ones replay
                logits = run.step(int(torch.argmax(logits)))

    def stop_compiling(self, error: Exception) -> None:
        """Decode with static caches but without the compiled step from now on (logged once)."""
        with self._lock:
            if self._step is self.model:
                return
            self._step, self.mode = self.model, "static"
        log.warning("compiled decoding failed (%s: %s); decoding without it from now on", type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "")

    def _take_slot(self):
        # Deferred: transformers takes seconds to import; only a static-cache decoder needs it.
        from transformers import StaticCache

        with self._lock:
            if self._free_slots:
                return self._free_slots.pop()
            if self._slots >= self.max_slots:
                return None
            self._slots += 1
        return StaticCache(config=self.model.config, max_cache_len=self.cache_tokens)

    def _give_back(self, slot) -> None:
        with torch.inference_mode():  # its tensors were made in inference mode; zeroing them must be too
            slot.reset()
        with self._lock:
            self._free_slots.append(slot)


class DecodeRun:
    """One generation's KV cache: ``prefill`` once, then ``step`` per token; ``close`` when done."""

    def __init__(self, decoder: Decoder, slot):
        self.decoder, self.slot = decoder, slot
        self.cache = slot  # None: a dynamic cache made by the first forward
        self.static = slot is not None

    @torch.inference_mode()
    def _forward(self, call, ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self.decoder.keep_last else {}
        out = call(input_ids=ids, past_key_values=self.cache, use_cache=True, **kwargs)
        self.cache = out.past_key_values
        return out.logits[0, -1].float()

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Logits after the prompt (shape [1, n]); run eagerly: prompts differ in length."""
        return self._forward(self.decoder.model, prompt_ids.to(self.decoder.model.device))

    def step(self, token_id: int) -> torch.Tensor:
        """Logits after one more token: the compiled step when this run has a static slot.

        If the compiled step fails (a compiler or CUDA-graph error that warm-up did not meet, say
        on another thread), the model stops using it, and this answer ends with a message: its
        cache may be half-written, so it cannot go on. The next message decodes without compiling.
        """
        ids = torch.tensor([[token_id]], device=self.decoder.model.device)
        call = self.decoder._step if self.static else self.decoder.model
        try:
            logits = self._forward(call, ids)
        except Exception as exc:
            if call is self.decoder.model:
                raise
            self.decoder.stop_compiling(exc)
            raise MergeStudioError("compiled decoding failed for this model, so it now decodes without it; "
                                   "send your message again") from None
        # A CUDA-graph replay writes its outputs into the same buffers each time: copy before the next step.
        return logits.clone() if self.static and self.decoder.mode == "compiled" else logits

    def close(self) -> None:
        """Free a dynamic cache, or reset a static slot and give it back (idempotent)."""
        slot, self.slot, self.cache = self.slot, None, None
        if slot is not None:
            self.decoder._give_back(slot)

    def __enter__(self) -> DecodeRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
