"""The process's runtime: the compute device, where caches live, and the one way models load.

Every model loaded in the process (evaluation, calibration, the chat pool, the demo family's
conversion and training, the Models tab's meta-device estimate) goes through ``load_model`` or
``meta_model``, and so through ``MODEL_LOAD_LOCK``: transformers' ``from_pretrained`` is not
thread-safe (it builds models under a process-wide meta-device context, and its lazy module
import can fail when two threads touch it first). Under load, concurrent loads failed with
"Cannot copy out of meta tensor" (bench/load.py) until every load took this lock.

Models are always loaded with ``trust_remote_code=False`` and ``local_files_only=True``: a
reference is resolved to a checked local folder by ``merging.sources`` first, so the loader
never reaches the network or runs a repository's code.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from merging.checkpoint import pickle_files, pickle_refusal, safetensors_files
from merging.errors import MergeStudioError

CACHE_ENV = "MERGE_STUDIO_CACHE"
MODEL_LOAD_LOCK = threading.RLock()
# transformers' lazy names fail when two threads resolve them first at once ("cannot import name
# AutoModelForCausalLM"): the deferred imports below take this lock (not the load lock, which a
# long load holds for minutes).
IMPORT_LOCK = threading.Lock()


def _fresh_load_lock() -> None:
    """In a forked child (a ZeroGPU call's worker) the lock may be held by a parent thread that
    does not exist there: the child starts with a free one."""
    global MODEL_LOAD_LOCK
    MODEL_LOAD_LOCK = threading.RLock()
# transformers' lazy names fail when two threads resolve them first at once ("cannot import name
# AutoModelForCausalLM"): the deferred imports below take this lock (not the load lock, which a
# long load holds for minutes).
IMPORT_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_load_lock)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeStudioError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MergeStudioError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def cache_root() -> Path:
    """``$MERGE_STUDIO_CACHE``, else ``~/.cache/merge-studio``: the demo family, calibration
    statistics, votes and the studio's session folders live under it."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "merge-studio").expanduser()


def load_model(folder: str | Path, *, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32,
               allow_pickle: bool = False, gguf_file: str | None = None, purpose: str = "inference"):
    """(model, tokenizer) of a local model folder, in eval mode on ``device``, weights in ``dtype``.

    ``gguf_file``: load that GGUF file of the folder instead (transformers dequantizes it).
    On a GPU, accelerate places the weights straight onto it (``device_map``), without a first
    copy in CPU memory. A folder transformers cannot load raises a ``MergeStudioError`` naming
    ``purpose`` and the reason.
    """
    with IMPORT_LOCK:
        # Deferred: transformers takes seconds to import, and the CLI's merge never loads a model.
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load clutters the CLI's and the app's own progress
    if not gguf_file and not allow_pickle and not safetensors_files(Path(folder)) and pickle_files(Path(folder)):
        raise MergeStudioError(pickle_refusal(str(folder)))
    target = pick_device(device)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": False, "local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    elif not allow_pickle:
        kwargs["use_safetensors"] = True
    if target.type == "cuda":
        kwargs["device_map"] = {"": target.index if target.index is not None else torch.cuda.current_device()}
    tokenizer_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with MODEL_LOAD_LOCK:
            tokenizer = load_tokenizer(folder, **tokenizer_kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
            if target.type != "cuda":
                model = model.to(target)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeStudioError(f"cannot load model {folder} for {purpose}: {reason}") from None
    return model.eval(), tokenizer


def load_tokenizer(folder: str | Path, **kwargs):
    """The tokenizer of a local model folder (never remote code)."""
    with IMPORT_LOCK:
        # Deferred: transformers takes seconds to import.
        from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True, **kwargs)


def meta_model(config: dict):
    """The model a config describes, built on the meta device (no memory, no weights), or None
    for an architecture transformers does not know."""
    with IMPORT_LOCK:
        # Deferred: accelerate and transformers take seconds to import.
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

    try:
        # init_empty_weights patches module construction process-wide: a model loading in another
        # thread meanwhile would be built on the meta device too, hence the lock.
        with MODEL_LOAD_LOCK, init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), trust_remote_code=False)
        model.tie_weights()
    except Exception:  # an unknown or malformed architecture: no model, not an error
        return None
    return model
