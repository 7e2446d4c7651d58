"""The chat model pool: each model loaded once, shared by every user, within a memory budget.

``pool.get(ref)`` resolves a reference (local folder, Hub id, merge output) with the source
policy, and returns a *lease* on the one loaded copy of that model: a ``ModelHandle`` that
must be released (``with pool.get(ref) as handle: ...`` or ``handle.release()``). Leases are
what keep a model in memory while it generates: eviction only ever touches models nobody
holds.

Memory is accounted in bytes of weights on the target device:

- before loading, from the safetensors headers (shapes and dtypes, no tensor data read), at
  the dtype the model will be loaded in, so a model that can never fit the budget is refused
  with the numbers before a byte is loaded;
- after loading, measured from the model's parameters and buffers (tied weights once).

Room is made by evicting the least recently used models that nobody holds. If the models
held right now leave too little room, ``get`` waits up to ``wait_s`` seconds for leases to
be released, then refuses with a message naming what is in use. The KV cache and activations
of a generation are not part of the budget: for chat-length contexts on small models they
are a few percent of the weights; leave that headroom when choosing the budget.

Each loaded model gets a ``chat.decoding.Decoder`` (a dynamic KV cache on CPU; static caches and a
compiled step on CUDA, compiled while loading, not on a user's first message).

A model is identified by its resolved folder plus a fingerprint of its weights files (inode,
size, mtime), so a merge output re-created at the same path is loaded afresh; the old copy
is freed as soon as no one holds it.

Thread safety: one pool lock guards the bookkeeping (never held while loading or freeing),
and one lock per model serialises its loading, so two users asking for the same model at
once load it once. Loads of different models wait for each other on
``merging.runtime.MODEL_LOAD_LOCK`` (the process's one model loader): transformers'
``from_pretrained`` is not thread-safe (each load still has its budget reserved first, so
waiting loads cannot overshoot it).
"""

from __future__ import annotations

import gc
import logging
import os
import random
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch

from chat.decoding import Decoder, decoding_mode
from merging.checkpoint import INDEX_NAME, CheckpointReader, pickle_files, safetensors_files
from merging.errors import MergeStudioError
from merging.prompts import has_chat_template
from merging.runtime import load_model, pick_device
from merging.hub import Token
from merging.sources import SourcePolicy, resolve_model, snapshot_download
from merging.units import format_bytes, parse_size

log = logging.getLogger("merge_studio.chat")

BUDGET_ENV = "MERGE_STUDIO_CHAT_BUDGET"  # e.g. "4GB"; read by default_budget()
DEFAULT_BUDGET_FRACTION = 0.5  # of the memory available on the device when no budget is given

Key = tuple[str, tuple]  # (resolved folder, fingerprint of its weights files)


def chat_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bfloat16 matmuls are slow on most CPUs); bfloat16 on a GPU that has it, else float16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_budget(value: int | float | str, source: str = "the chat memory budget") -> int:
    """A positive number of bytes from 1_000_000, '4GB', '500MB' or '1.5GiB'."""
    if isinstance(value, float) and not isinstance(value, bool):
        value = int(value)
    return parse_size(value, source)


def default_budget(device: torch.device) -> int:
    """``$MERGE_STUDIO_CHAT_BUDGET`` if set, else half the memory now available on ``device``."""
    if os.environ.get(BUDGET_ENV):
        return parse_budget(os.environ[BUDGET_ENV], f"${BUDGET_ENV}")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_BUDGET_FRACTION)
    return int(psutil.virtual_memory().available * DEFAULT_BUDGET_FRACTION)


def weights_fingerprint(folder: Path) -> tuple:
    """(name, inode, size, mtime_ns) of every weights file and index: changes when a folder is rewritten."""
    files = safetensors_files(folder) or pickle_files(folder)
    files += [folder / INDEX_NAME] if (folder / INDEX_NAME).is_file() else []
    stamp = []
    try:
        for path in sorted(files):
            st = path.stat()
            stamp.append((path.name, st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError as exc:  # e.g. a merge replaced the folder between listing and stat
        raise MergeStudioError(f"cannot read the weights of {folder} ({exc.strerror or exc}); try again") from None
    return tuple(stamp)


def estimate_bytes(folder: Path, dtype: torch.dtype, *, allow_pickle: bool = False) -> int:
    """Bytes the weights of ``folder`` take once loaded with floating tensors cast to ``dtype``.

    Read from the checked safetensors headers only (pickles, when allowed, are memory-mapped):
    sum over tensors of numel x element size, integer tensors keeping their own dtype.
    """
    reader = CheckpointReader(folder, allow_pickle=allow_pickle)
    try:
        element = torch.empty((), dtype=dtype).element_size()
        total = 0
        for name in reader.names():
            info = reader.info(name)
            if info.dtype.is_floating_point:
                total += info.nbytes // torch.empty((), dtype=info.dtype).element_size() * element
            else:
                total += info.nbytes
        return total
    finally:
        reader.close()


def module_nbytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model``, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class _NoRoomNow(MergeStudioError):
    """The models held right now leave no room (a later try may succeed)."""


@dataclass(eq=False)
class _Entry:
    """One loaded copy of a model, shared by every lease on it."""

    key: Key
    ref: str  # the reference it was first asked for by
    folder: Path
    nbytes: int
    model: torch.nn.Module | None
    tokenizer: object | None
    decoder: Decoder | None
    # Fast tokenizers raise "Already borrowed" when two threads use one at once.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    leases: int = 0
    retired: bool = False  # its folder changed on disk: no new leases, freed when the last goes


class ModelHandle:
    """A lease on one loaded model: ``model``, ``tokenizer``, ``ref``, ``folder``, ``nbytes``, ``device``.

    The model stays loaded until the lease is released; a released handle refuses to hand out
    the model. Release it with ``release()`` or by using the handle as a context manager; a
    handle dropped without release is released when it is garbage collected, but do not rely
    on that timing.
    """

    def __init__(self, pool: ModelPool, entry: _Entry, ref: str):
        self.ref = ref
        self.folder = entry.folder
        self.nbytes = entry.nbytes
        self._entry = entry
        self._release = weakref.finalize(self, pool._release, entry)

    @property
    def released(self) -> bool:
        return not self._release.alive

    def _live(self) -> _Entry:
        if self.released:
            raise MergeStudioError(f"the chat handle of {self.ref!r} was released; get the model from the pool again")
        return self._entry

    @property
    def model(self) -> torch.nn.Module:
        return self._live().model

    @property
    def tokenizer(self):
        return self._live().tokenizer

    @property
    def decoder(self) -> Decoder:
        return self._live().decoder

    @property
    def tokenizer_lock(self) -> threading.Lock:
        return self._entry.tokenizer_lock

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def templated(self) -> bool:
        """False for a model without a chat template: it is prompted in plain-completion mode."""
        return has_chat_template(self.tokenizer)

    def release(self) -> None:
        """Give the lease back (idempotent); the model may then be evicted."""
        self._release()

    def __enter__(self) -> ModelHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "leased"
        return f"ModelHandle({self.ref!r}, {format_bytes(self.nbytes)}, {state})"


@dataclass(frozen=True)
class LoadedModel:
    """What the pool holds, for display: one row per loaded model."""

    ref: str
    folder: Path
    nbytes: int
    leases: int


class ModelPool:
    """Loaded chat models shared between users, within ``budget_bytes`` of weights.

    ``budget_bytes``: an int or a size such as ``"4GB"``; ``None`` means ``default_budget``.
    ``device``: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:n]``. ``dtype``: default
    ``chat_dtype(device)``. ``wait_s``: how long ``get`` waits for held models to be released
    when they leave too little room, before refusing. ``download``: the Hub downloader of
    ``merging.sources.resolve_model``. ``decoding``: how loaded models decode (``chat.decoding``:
    auto, dynamic, static or compiled; default ``$MERGE_STUDIO_CHAT_DECODING`` or auto, i.e.
    compiled on CUDA, warmed up when the model loads). ``run_device``: where generation runs when
    it is not ``device`` (ZeroGPU keeps the models on the CPU and moves them for each answer).
    """

    def __init__(
        self,
        budget_bytes: int | str | None = None,
        device: str = "auto",
        policy: SourcePolicy = SourcePolicy(),
        *,
        dtype: torch.dtype | None = None,
        wait_s: float = 0.0,
        download: Callable[[str, str | None, list[str], Token], str] = snapshot_download,
        decoding: str | None = None,
        run_device: str | None = None,
    ):
        self.device = pick_device(device)
        # Where generation runs when not where the models are kept (ZeroGPU: kept on the CPU, moved
        # to CUDA for each generation; ``studio.zerogpu.on_device``); None: where they are kept.
        self.run_device = torch.device(run_device) if run_device else None
        self.dtype = dtype or chat_dtype(self.device)
        self.decoding = decoding_mode(decoding, self.device)
        self.budget_bytes = default_budget(self.device) if budget_bytes is None else parse_budget(budget_bytes)
        self.policy = policy
        self.wait_s = wait_s
        self._download = download
        # Re-entrant: a handle dropped without release() is released by its finalizer, which the
        # cyclic garbage collector may run at any allocation, including one made while this
        # thread holds the lock; a plain Lock would then deadlock the pool for every user.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a lease was released or a load finished
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._retired: list[_Entry] = []  # stale versions still leased
        self._reserved = 0  # budget held by loads in progress
        self._load_locks: dict[Key, threading.Lock] = {}
        self._hub_folders: dict[str, Path] = {}  # Hub id -> downloaded folder, so a get is not a network call
        self.loads = 0  # models loaded so far (a shared model counts once)
        pool = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (me := pool()) is not None and me._after_fork())

    def _after_fork(self) -> None:
        """A forked child (a ZeroGPU call's worker) gets locks of its own: the parent's may be held by
        threads that do not exist there. Leases those threads hold stay counted, so their models are
        not evicted in the child either."""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._load_locks = {}

    # -- public ----------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Budget in use: loaded models, stale copies still held, and loads in progress."""
        with self._lock:
            return self._used()

    def loaded(self) -> list[LoadedModel]:
        """The models in memory, least recently used first."""
        with self._lock:
            return [LoadedModel(e.ref, e.folder, e.nbytes, e.leases) for e in self._entries.values()]

    def is_loaded(self, ref: str) -> bool:
        """Whether ``ref`` is in memory now. Never downloads: a Hub id counts once this pool fetched it."""
        folder = self._hub_folders.get(ref)
        if folder is None:
            local = Path(ref).expanduser()
            if not local.exists():
                return False
            folder = local.resolve()
        with self._lock:
            return any(key[0] == str(folder) for key in self._entries)

    def estimate(self, ref: str) -> int:
        """Bytes ``ref`` would take in this pool, from its headers (nothing is loaded)."""
        return estimate_bytes(self._resolve(ref), self.dtype, allow_pickle=self.policy.allow_pickle)

    def get(self, ref: str) -> ModelHandle:
        """A lease on the loaded copy of ``ref``, loading it (once, whoever asks) if needed.

        Raises ``MergeStudioError`` if the reference does not resolve under the policy, if the
        model can never fit the budget (before loading, with both numbers), or if the models
        held right now leave no room for it within ``wait_s``.
        """
        return self._get(ref, self.wait_s)

    def get_many(self, refs: list[str]) -> list[ModelHandle]:
        """Leases on several models used together (the chat panels), or none at all.

        Refused up front, with the numbers, when together they exceed the budget, so a request
        for four panels never evicts and reloads its own models in turn. While waiting for room
        it holds none of them: two users who each held one model of their set and waited for the
        other's to go would otherwise block each other until one timed out.
        """
        folders = {str(self._resolve(ref)): ref for ref in refs}
        if len(folders) > 1:
            sizes = {ref: self.estimate(ref) for ref in folders.values()}
            total = sum(sizes.values())
            if total > self.budget_bytes:
                listing = ", ".join(f"{ref} {format_bytes(size)}" for ref, size in sizes.items())
                raise MergeStudioError(
                    f"these {len(sizes)} models need about {format_bytes(total)} together ({listing}) but the "
                    f"chat memory budget is {format_bytes(self.budget_bytes)}; compare fewer or smaller models"
                )
        deadline = time.monotonic() + self.wait_s
        while True:
            handles: list[ModelHandle] = []
            try:
                for ref in refs:
                    handles.append(self._get(ref, wait_s=0.0))
                return handles
            except _NoRoomNow:
                for handle in handles:
                    handle.release()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                with self._lock:  # until a lease is released or a load finishes; jittered, so two retry apart
                    self._changed.wait(min(remaining, random.uniform(0.05, 0.5)))
            except BaseException:
                for handle in handles:
                    handle.release()
                raise

    @contextmanager
    def leased(self, refs: list[str]) -> Iterator[list[ModelHandle]]:
        """``get_many(refs)`` for the duration of a ``with`` block; every lease is released after it."""
        handles = self.get_many(refs)
        try:
            yield handles
        finally:
            for handle in handles:
                handle.release()

    def clear(self) -> None:
        """Unload every model nobody holds."""
        with self._lock:
            victims = [e for e in self._entries.values() if e.leases == 0]
            for entry in victims:
                del self._entries[entry.key]
        self._free(victims)

    # -- internals -------------------------------------------------------------------------

    def _get(self, ref: str, wait_s: float) -> ModelHandle:
        folder = self._resolve(ref)
        key = (str(folder), weights_fingerprint(folder))
        with self._load_lock(key):
            entry = self._lease_loaded(key)
            if entry is None:
                entry = self._load(key, ref, folder, wait_s)
        return ModelHandle(self, entry, ref)

    def _used(self) -> int:
        return sum(e.nbytes for e in self._entries.values()) + sum(e.nbytes for e in self._retired) + self._reserved

    def _resolve(self, ref: str) -> Path:
        if ref in self._hub_folders:
            return self._hub_folders[ref]
        folder = resolve_model(ref, self.policy, self._download).whole_folder().resolve()
        if not Path(ref).expanduser().exists():  # downloaded: remember it (the Hub is asked once per pool)
            self._hub_folders[ref] = folder
        return folder

    def _load_lock(self, key: Key) -> threading.Lock:
        with self._lock:
            return self._load_locks.setdefault(key, threading.Lock())

    def _lease_loaded(self, key: Key) -> _Entry | None:
        """Lease the loaded copy for ``key`` if there is one; retire older versions of its folder."""
        stale = []
        with self._lock:
            for other in list(self._entries.values()):
                if other.key[0] == key[0] and other.key != key:
                    del self._entries[other.key]
                    self._load_locks.pop(other.key, None)
                    if other.leases:
                        other.retired = True
                        self._retired.append(other)
                    else:
                        stale.append(other)
            entry = self._entries.get(key)
            if entry is not None:
                entry.leases += 1
                self._entries.move_to_end(key)
        self._free(stale)
        return entry

    def _load(self, key: Key, ref: str, folder: Path, wait_s: float) -> _Entry:
        need = estimate_bytes(folder, self.dtype, allow_pickle=self.policy.allow_pickle)
        dtype_name = str(self.dtype).removeprefix("torch.")
        if need > self.budget_bytes:
            raise MergeStudioError(
                f"model {ref!r} needs about {format_bytes(need)} of memory ({dtype_name} weights on "
                f"{self.device.type}) but the chat memory budget is {format_bytes(self.budget_bytes)}, so it "
                f"can never be loaded here; choose a smaller model or raise the budget ({BUDGET_ENV})"
            )
        self._free(self._make_room(ref, need, wait_s))
        try:
            model, tokenizer = load_model(folder, device=self.device, dtype=self.dtype,
                                          allow_pickle=self.policy.allow_pickle, purpose="chat")
        except BaseException:
            with self._lock:
                self._reserved -= need
                self._changed.notify_all()
            raise
        decoder = self._decoder(model, tokenizer, ref)
        entry = _Entry(key, ref, folder, module_nbytes(model), model, tokenizer, decoder, leases=1)
        with self._lock:
            self._reserved -= need
            self._entries[key] = entry
            self.loads += 1
            # The measured size can exceed the header estimate by a few buffers (rotary tables).
            victims = self._pop_unleased_until(self.budget_bytes)
            self._changed.notify_all()
        self._free(victims)
        return entry

    def _decoder(self, model: torch.nn.Module, tokenizer, ref: str) -> Decoder:
        """The model's decoder, warmed up (compiled) now rather than on a user's first message.
        A compilation that fails leaves the model decoding with a dynamic cache: slower, working."""
        decoder = Decoder(model, self.decoding)
        try:
            decoder.warm_up(tokenizer.eos_token_id or 0)
        except Exception as exc:  # inductor / CUDA-graph failures take many forms
            log.warning("%s decoding of %s failed to warm up (%s: %s); it decodes with a dynamic cache",
                        self.decoding, ref, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            decoder = Decoder(model, "dynamic")
        return decoder

    def _make_room(self, ref: str, need: int, wait_s: float) -> list[_Entry]:
        """Reserve ``need`` bytes, evicting unheld models (least recently used first); returns them to free.
        Raises ``_NoRoomNow`` if the models held leave no room within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                unheld = sum(e.nbytes for e in self._entries.values() if e.leases == 0)
                if self._used() - unheld + need <= self.budget_bytes:
                    victims = self._pop_unleased_until(self.budget_bytes - need)
                    self._reserved += need
                    return victims
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _NoRoomNow(self._busy_message(ref, need))
                self._changed.wait(remaining)

    def _pop_unleased_until(self, target: int) -> list[_Entry]:
        """Remove unheld models, least recently used first, until the budget in use is <= ``target``."""
        victims = []
        for entry in list(self._entries.values()):
            if self._used() <= target:
                break
            if entry.leases == 0:
                del self._entries[entry.key]
                victims.append(entry)
        return victims

    def _busy_message(self, ref: str, need: int) -> str:
        held = [e for e in [*self._entries.values(), *self._retired] if e.leases]
        listing = ", ".join(f"{e.ref} {format_bytes(e.nbytes)}" for e in held) or "models being loaded"
        return (
            f"cannot load {ref!r} (about {format_bytes(need)}) now: the chat memory budget of "
            f"{format_bytes(self.budget_bytes)} is taken by models in use ({listing}); "
            "try again when they finish generating"
        )

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            free_now = entry.retired and entry.leases == 0
            if free_now:
                self._retired.remove(entry)
            elif entry.key in self._entries:
                self._entries.move_to_end(entry.key)
            self._changed.notify_all()
        if free_now:
            self._free([entry])

    def _free(self, entries: list[_Entry]) -> None:
        """Drop the pool's references to the weights and return their memory now, not at some later GC."""
        if not entries:
            return
        for entry in entries:
            entry.model = None
            entry.tokenizer = None
            entry.decoder = None
        gc.collect()  # models hold reference cycles (modules <-> hooks), so refcounting alone is not enough
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


_default_pool: ModelPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> ModelPool:
    """The process-wide pool used when none is passed: auto device, default policy and budget."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = ModelPool()
        return _default_pool
