"""ZeroGPU, the shared GPU tier most Spaces run on: GPU work inside ``@spaces.GPU`` calls.

On a ZeroGPU Space (``SPACES_ZERO_GPU=true``) a GPU is attached only while a function decorated
with ``spaces.GPU`` runs, in a worker process forked for the call: its arguments are pickled
there and its results back, and nothing it loads survives it. So:

- the heavy handlers (merge, statistics, the DARE sweep, evaluation, LoRA extraction, parameter
  search) run whole inside a GPU call, each asking for a duration sized to its work
  (``*_seconds``: shorter requests wait less in ZeroGPU's queue);
- chat models stay in the pool on the CPU of the main process (loading there costs no GPU time
  and is kept between calls); only the generation is a GPU call (``answers``), which moves the
  leased models to CUDA inside the call;
- a Stop cannot reach into the worker (a ``threading.Event`` does not cross processes): it takes
  effect before a call starts, and the requested duration bounds the call.

Everywhere else this module changes nothing: ``spaces.GPU`` returns the function as it is when
ZeroGPU is off, and without the ``spaces`` package the function is used as it is.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import gradio as gr
import torch

from chat import ModelPool, SamplingParams, stream_many
from merging.endpoints import is_endpoint, parse_endpoint
from merging.errors import MergeStudioError

ACTIVE = os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")
MAX_SECONDS = 900  # the longest call asked for; ZeroGPU caps it by the visitor's quota anyway
TASKS: dict[str, Callable] = {}  # name -> duration function of every function made a GPU task


def gpu(duration: Callable[..., int]):
    """Decorator: ``fn`` runs in a ZeroGPU call of ``duration(*args)`` seconds; unchanged off ZeroGPU."""
    def wrap(fn):
        TASKS[fn.__name__] = duration
        try:
            # Deferred: only the studio's build needs it (app.py imports it first on ZeroGPU).
            import spaces
        except ImportError:  # not on a Space and not installed: nothing to wrap for
            return fn
        return spaces.GPU(fn, duration=lambda *args, **kwargs: min(int(duration(*args, **kwargs)), MAX_SECONDS))
    return wrap


# -- durations: seconds asked of ZeroGPU, from the handler's own arguments -----------------------------

def merge_seconds(settings, text: str = "", *_args, **_kwargs) -> int:
    """A merge: reading and writing each model dominates; calibrated methods also run the models."""
    models = len(re.findall(r"\bmodel:", text or "")) or 2
    calibrated = any(word in (text or "") for word in ("fisher", "regmean", "calibration"))
    return 30 + 20 * models + (120 if calibrated else 0)


def stats_seconds(settings, base=None, sources=(), *_args, **_kwargs) -> int:
    return 30 + 20 * (1 + len(sources or []))


def sweep_seconds(*_args, **_kwargs) -> int:
    return 240  # one evaluation per drop rate


def eval_seconds(settings, refs=(), *_args, **_kwargs) -> int:
    return 30 + 90 * max(len(refs or []), 1)


def lora_seconds(*_args, **_kwargs) -> int:
    return 90  # an SVD per linear layer


def search_seconds(settings, *_args, **_kwargs) -> int:
    return int((settings.max_tune_minutes or 15) * 60)


def answer_seconds(refs: Sequence[str], conversations, params: SamplingParams, *_args) -> int:
    """Generation: models decode one token each in turn, a few dozen tokens a second on a GPU."""
    return 15 + len(refs) * params.max_new_tokens // 20


# -- chat: the pool stays on the CPU, generation moves to the device ---------------------------------

@contextmanager
def on_device(handles, device: torch.device | None) -> Iterator[None]:
    """The leased models on ``device`` for the block, then back where the pool keeps them. In a
    ZeroGPU worker the move back is moot (the worker's memory goes with it); in one process it
    keeps the pool's accounting true."""
    models = list({id(h.model): h.model for h in handles}.values()) if device is not None else []
    homes = [next(model.parameters()).device for model in models]
    try:
        for model in models:
            model.to(device)
        yield
    finally:
        for model, home in zip(models, homes):
            model.to(home)


_ANSWERS: dict[int, Callable] = {}  # id(pool) -> its GPU task, made once (ZeroGPU registers tasks at start)


def answers(pool: ModelPool) -> Callable:
    """``fn(refs, conversations, params, stop_event=None)`` yielding ``(panel, text so far)``: the
    answers of the pool's models, generated on ``pool.run_device`` (a GPU call on ZeroGPU). The
    caller leases the models first, so they load on the pool's device outside the call."""
    if id(pool) not in _ANSWERS:
        def generate(refs: Sequence[str], conversations, params: SamplingParams, stop_event=None):
            local = [ref for ref in refs if not is_endpoint(ref)]  # endpoints answer from their servers
            try:
                with pool.leased(local) as handles, on_device(handles, pool.run_device):
                    leased = iter(handles)
                    panels = [parse_endpoint(ref) if is_endpoint(ref) else next(leased) for ref in refs]
                    yield from stream_many(panels, conversations, params, stop_event)
            except MergeStudioError as exc:  # as a gr.Error: the one kind ZeroGPU passes on from its worker
                raise gr.Error(str(exc), print_exception=False) from None

        generate.__name__ = "answers"
        on_gpu = gpu(answer_seconds)(generate)

        def dispatch(refs: Sequence[str], conversations, params: SamplingParams, stop_event=None):
            # served models only: no GPU work here, so no GPU call (and none of the visitor's quota)
            run = generate if all(is_endpoint(ref) for ref in refs) else on_gpu
            yield from run(refs, conversations, params, stop_event)

        _ANSWERS[id(pool)] = dispatch
    return _ANSWERS[id(pool)]


def chat_pool(settings, policy) -> ModelPool:
    """The studio's shared chat pool: on ZeroGPU the models stay on the CPU and answer on CUDA."""
    if ACTIVE:
        return ModelPool(None, "cpu", policy, wait_s=30.0, run_device="cuda")
    return ModelPool(None, settings.device, policy, wait_s=30.0)
