"""Calibration: what the data-aware merge methods learn by running each model on a little text.

- **Diagonal Fisher** (Fisher merging, Matena & Raffel 2022, https://arxiv.org/abs/2111.09832):
  F = mean over examples of (∂ log p(x)/∂θ)², with log p(x) = Σₜ log p(xₜ | x<ₜ) over the
  example's tokens (the empirical Fisher of the text itself); for a chat, over the reply's
  tokens given the conversation (log p(y | x), as the paper's classifiers score the label). Each example gets its own
  backward pass: the diagonal needs every example's gradient squared on its own. (MergeLM and
  FusionBench square gradients summed over a batch, which adds cross-example terms.)
- **RegMean Gram matrices** (Jin et al. 2023, https://arxiv.org/abs/2212.09849): for every
  linear layer (``nn.Linear``, and GPT-2's ``Conv1D`` whose weight is stored (in, out)),
  G = XᵀX / N over the N non-padding token positions of the layer's inputs. The mean (as the
  paper's code keeps it) stops a model with more calibration text from dominating the merge.
  Projections that read the same input tensor (q/k/v, gate/up) share one Gram: at 7B scale the
  Grams would otherwise take ~27 GB per model. Grams are accumulated and stored in float64:
  layer inputs have outlier dimensions, and a small model's summed Gram had eigenvalues from
  1e-8 to 6; accumulated in float32, RegMean's solve turned the rounding into weights up to 10.

Each kind of statistic is a ``CalibrationKind`` object (``FISHER``, ``GRAMS``): a method's spec
names one, and the engine calls it without knowing which it is. Calibration texts are files,
inline lists, or sources registered by name (``register_calibration_source``: the demo family
registers its tasks).

Results are cached as safetensors under ``<cache>/calibration/``, keyed by the model's weight
files (path, size, modification time), the calibration examples and the settings; a cache file
appears atomically, so an interrupted run never leaves a corrupt one. The merge then streams
these statistics tensor by tensor beside the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merging.checkpoint import CheckpointReader, process_alive, safetensors_files
from merging.errors import MergeCancelled, MergeStudioError, RecipeError, SourceError, check_cancel
from merging.prompts import encode as encode_prompt
from merging.prompts import render
from merging.grams import CANCELLED, TOKENS_PER_BATCH, GramRecorder, padded_batch, similar_length_batches
from merging.propagation import propagated_grams
from merging.runtime import cache_root, load_model, load_tokenizer
from merging.sources import SourcePolicy, allowed_path

CACHE_VERSION = "3"  # bump when the statistics' definition changes (3: float64 Grams, plain-text chats)

Message = dict  # {"role": ..., "content": ...}
Example = Union[str, tuple[Message, ...]]  # plain text, or a chat rendered with the model's template
ProgressFn = Callable[[int, int], None]
SAMPLES_PARAM, MAX_LENGTH_PARAM = "calibration_samples", "calibration_max_length"  # what a data-aware spec declares


@dataclass(frozen=True)
class CalibrationSettings:
    samples: int = 128
    max_length: int = 256

    @classmethod
    def from_parameters(cls, values: dict) -> CalibrationSettings:
        """From a data-aware method's resolved parameters (``calibration_samples``, ``calibration_max_length``)."""
        return cls(int(values.get(SAMPLES_PARAM, cls.samples)), int(values.get(MAX_LENGTH_PARAM, cls.max_length)))


# -- calibration data -----------------------------------------------------------------------

_SOURCES: dict[str, tuple[Callable[[], list[Example]], str]] = {}


def register_calibration_source(name: str, load: Callable[[], list[Example]], description: str) -> None:
    """Offer ``load()`` (texts, or chats as tuples of messages) as the calibration text ``name``."""
    _SOURCES[name] = (load, description)


def calibration_sources() -> dict[str, str]:
    """name -> description of every registered calibration source."""
    return {name: description for name, (_, description) in _SOURCES.items()}


def sources_hint() -> str:
    """How a recipe names calibration text, for error messages."""
    names = ", ".join(repr(name) for name in _SOURCES)
    named = f", a registered source ({names})" if names else ""
    return f"a text or JSONL file{named}, or a non-empty list of texts"


def load_examples(source, samples: int, policy: SourcePolicy = SourcePolicy(), where: str = "calibration") -> list[Example]:
    """The first ``samples`` examples of a calibration source.

    ``source`` is a list of strings (inline texts), the name of a registered source (the demo
    family's tasks: their training conversations, never the held-out prompts), or a file:
    ``.jsonl`` lines with ``text``, or ``messages``, or ``prompt`` and ``answer``; any other file
    is UTF-8 text, one example per line.
    """
    if isinstance(source, list):
        examples: list[Example] = [s for s in source if isinstance(s, str) and s.strip()]
    elif isinstance(source, str) and source in _SOURCES:
        examples = list(_SOURCES[source][0]())
    elif isinstance(source, str):
        examples = _read_file(Path(source).expanduser(), policy, where)
    else:
        raise RecipeError(f"{where}: expected {sources_hint()}, not {source!r}")
    if not examples:
        raise RecipeError(f"{where}: the calibration data {_short(source)} has no examples")
    return examples[:samples]


def chat_example(prompt: str, answer: str) -> tuple[Message, ...]:
    """A one-turn chat as a calibration example (its reply is what Fisher scores)."""
    return ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})


def _short(source) -> str:
    return f"{len(source)} inline texts" if isinstance(source, list) else repr(source)


def _read_file(path: Path, policy: SourcePolicy, where: str) -> list[Example]:
    if not allowed_path(path, policy):
        raise SourceError(f"{where}: reading files from the server is disabled on this hosted studio; upload the text instead")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{where}: calibration file {str(path)!r} not found (give {sources_hint()})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{where}: cannot read calibration file {str(path)!r}: {exc}") from None
    if path.suffix != ".jsonl":
        return [line for line in text.splitlines() if line.strip()]
    examples: list[Example] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            examples.append(_json_example(item))
        except (ValueError, KeyError, TypeError):
            raise RecipeError(
                f"{where}: {path}, line {number}: expected a JSON object with \"text\", \"messages\", "
                "or \"prompt\" and \"answer\""
            ) from None
    return examples


def _json_example(item: dict) -> Example:
    if "text" in item:
        return str(item["text"])
    if "messages" in item:
        return tuple({"role": str(m["role"]), "content": str(m["content"])} for m in item["messages"])
    return chat_example(str(item["prompt"]), str(item["answer"]))


def encode(tokenizer, example: Example, max_length: int) -> list[int]:
    """Token ids of one example (chats through the model's chat template, or as a plain
    transcript when it has none: ``merging.prompts``), truncated."""
    if isinstance(example, str):
        ids = tokenizer(example, add_special_tokens=True)["input_ids"]
    else:
        ids = encode_prompt(tokenizer, render(tokenizer, example, add_generation_prompt=False))
    return list(ids)[:max_length]


def scored_from(tokenizer, example: Example, max_length: int) -> int:
    """The first token position whose log-probability counts: 1 for plain text (every next
    token), and the start of the final assistant reply for a chat, so a chat's likelihood is
    log p(reply | conversation so far), the quantity a chat model is fine-tuned on."""
    if isinstance(example, str) or len(example) < 2 or example[-1].get("role") != "assistant":
        return 1
    ids = encode_prompt(tokenizer, render(tokenizer, example[:-1], add_generation_prompt=True))
    return max(1, min(len(ids), max_length - 1))


def examples_digest(examples: list[Example]) -> str:
    return hashlib.sha256(json.dumps(examples, ensure_ascii=False).encode()).hexdigest()


# -- the cache -------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$MERGE_STUDIO_CALIBRATION_CACHE``, else ``calibration/`` in the user cache."""
    return Path(os.environ.get("MERGE_STUDIO_CALIBRATION_CACHE") or cache_root() / "calibration").expanduser()


def cache_key(kind: str, folder: Path, examples: list[Example], settings: CalibrationSettings) -> str:
    """Identity of one model's statistics: its weight files, the examples and the settings."""
    files = []
    for path in safetensors_files(folder):
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    identity = {
        "version": CACHE_VERSION, "kind": kind, "files": files, "examples": examples_digest(examples),
        "samples": settings.samples, "max_length": settings.max_length,
    }
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def _save_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path.parent)
    handle, temp = tempfile.mkstemp(prefix=f".{path.stem}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, temp, metadata=metadata)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _remove_dead_temps(folder: Path) -> None:
    """Delete half-written cache files (``.<name>-<pid>-<random>.tmp``) of processes that died."""
    for temp in folder.glob(".*.tmp"):
        pid = temp.name.rsplit(".", 1)[0].split("-")[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            temp.unlink(missing_ok=True)


def _cached(path: Path) -> bool:
    """A cache file that opens; a damaged one is removed so it is recomputed."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.metadata()
        return True
    except Exception:
        path.unlink(missing_ok=True)
        return False


# -- statistics ------------------------------------------------------------------------------

def _checkpoint_name(param_name: str, stored: set[str]) -> str | None:
    """The stored tensor name of a loaded parameter (transformers may add or drop a prefix)."""
    if param_name in stored:
        return param_name
    parts = param_name.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in stored:
            return ".".join(parts[i:])
    return next((name for name in stored if name.endswith("." + param_name)), None)


def _stored_names(folder: Path) -> set[str]:
    reader = CheckpointReader(folder)
    try:
        return set(reader.names())
    finally:
        reader.close()


def compute_fisher(model, tokenizer, examples: list[Example], max_length: int,
                   progress: ProgressFn | None = None, cancel=None) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal Fisher of every floating parameter (by loaded name), and the tokens scored.

    F = (1/n) Σₑ (∇θ Σₜ log p(xₜ | x<ₜ))², one backward pass per example; t runs over every
    token of a plain text and over the reply of a chat (``scored_from``).
    """
    params = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    for _, p in params:
        p.requires_grad_(True)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params}
    tokens = 0
    model.eval()  # no dropout: the Fisher of the model as it is used
    for index, example in enumerate(examples):
        check_cancel(cancel, CANCELLED, MergeCancelled)
        ids = torch.tensor([encode(tokenizer, example, max_length)], device=model.device)
        start = scored_from(tokenizer, example, max_length)
        if ids.shape[1] <= start:
            continue
        logits = model(input_ids=ids).logits[:, start - 1 : -1].float()
        log_likelihood = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, start:, None]).sum()
        grads = torch.autograd.grad(log_likelihood, [p for _, p in params], allow_unused=True)
        for (name, _), grad in zip(params, grads):
            if grad is not None:
                fisher[name].addcmul_(grad.float(), grad.float())
        tokens += ids.shape[1] - start
        if progress is not None:
            progress(index + 1, len(examples))
    for _, p in params:
        p.requires_grad_(False)
    for value in fisher.values():
        value.div_(max(1, len(examples)))
    return fisher, tokens


def _linear_layers(model):
    """(module name, module, stored transposed) for every linear layer."""
    # Deferred: transformers takes seconds to import (the merge CLI imports this module).
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, module, False
        elif isinstance(module, Conv1D):  # y = x W + b with W stored (in, out)
            yield name, module, True


def encoded_batches(tokenizer, examples: list[Example], max_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The examples as padded batches of similar length (``TOKENS_PER_BATCH`` tokens at most)."""
    encoded = [ids for ids in (encode(tokenizer, ex, max_length) for ex in examples) if ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [padded_batch(batch, pad) for batch in similar_length_batches(encoded, TOKENS_PER_BATCH)]


@torch.inference_mode()
def compute_grams(model, tokenizer, examples: list[Example], max_length: int,
                  progress: ProgressFn | None = None, cancel=None) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """RegMean Grams: ({owner module: XᵀX/N}, {module: owner module}, N tokens), recorded by
    ``GramRecorder`` hooks on every linear layer."""
    recorder = GramRecorder([(name, module) for name, module, _ in _linear_layers(model)])
    tokens = done = 0
    try:
        batches = encoded_batches(tokenizer, examples, max_length)
        total = sum(len(ids) for ids, _ in batches)
        for input_ids, attention in batches:
            check_cancel(cancel, CANCELLED, MergeCancelled)
            recorder.mask = attention.reshape(-1).bool().to(model.device)
            model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device))
            recorder.batch_done()
            tokens += int(attention.sum())
            done += len(input_ids)
            if progress is not None:
                progress(done, total)
    finally:
        recorder.remove()
    for gram in recorder.grams.values():
        gram.div_(max(1, tokens))
    return recorder.grams, recorder.owner, tokens


# -- the kinds of statistics -------------------------------------------------------------------

class CalibrationKind:
    """What a data-aware method needs each model run on its calibration text for.

    ``compute`` runs one loaded model and returns the tensors and metadata to cache (keyed by
    stored tensor names, so the merge can stream them beside the weights); ``tensor_stats``
    gives a method, for one tensor being merged, this model's statistics from the cache file.
    """

    name: str  # prefix of the cache files and ``kind`` in their metadata
    description: str
    joint = False  # True: all models are calibrated together (``compute_jointly``), not one by one

    def compute(self, model, tokenizer, stored: set[str], examples: list[Example], settings: CalibrationSettings,
                progress: ProgressFn | None, cancel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        raise NotImplementedError

    def tensor_stats(self, stats: CalibrationStats, name: str, device: torch.device):
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class DiagonalFisher(CalibrationKind):
    """Per stored tensor, the diagonal Fisher; ``tensor_stats``: (Fisher or None, its global L2 norm)."""

    name = "fisher"
    description = "the diagonal Fisher of its parameters"

    def compute(self, model, tokenizer, stored, examples, settings, progress, cancel):
        fisher, tokens = compute_fisher(model, tokenizer, examples, settings.max_length, progress, cancel)
        tensors = {}
        for name, value in fisher.items():
            key = _checkpoint_name(name, stored)
            if key is not None:
                tensors[key] = value
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in tensors.values())).item()
        return tensors, {"tokens": str(tokens), "examples": str(len(examples)), "norm": repr(norm)}

    def tensor_stats(self, stats, name, device):
        fisher = stats.tensor(name)
        return (None if fisher is None else fisher.to(device), float(stats.metadata.get("norm", "nan")))


class InputGrams(CalibrationKind):
    """Per linear weight, the Gram XᵀX/N of its layer's inputs (float64); ``tensor_stats``:
    (Gram, whether the weight is stored (in, out)) or None for tensors that are not linear weights."""

    name = "gram"
    description = "the Gram matrices of its linear layers' inputs"

    def compute(self, model, tokenizer, stored, examples, settings, progress, cancel):
        grams, owner, tokens = compute_grams(model, tokenizer, examples, settings.max_length, progress, cancel)
        return gram_file(grams, owner, tokens, len(examples), model, stored)

    def tensor_stats(self, stats, name, device):
        entry = stats.lookup("weights").get(name)
        if entry is None:
            return None
        return stats.tensor(entry["gram"]).to(device), bool(entry["transposed"])  # q, k and v share one: read once


def gram_file(grams: dict[str, torch.Tensor], owner: dict[str, str], tokens: int, examples: int, model,
              stored: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a Gram cache file: ``gram.<owner module>`` tensors, and per
    stored linear weight the Gram it reads and whether it is stored (in, out)."""
    transposed = {name: t for name, _, t in _linear_layers(model)}
    weights = {}
    for name, owner_name in owner.items():
        key = _checkpoint_name(f"{name}.weight", stored)
        if key is not None and owner_name in grams:
            weights[key] = {"gram": f"gram.{owner_name}", "transposed": transposed[name]}
    tensors = {f"gram.{name}": gram for name, gram in grams.items()}
    return tensors, {"tokens": str(tokens), "examples": str(examples), "weights": json.dumps(weights)}


class PropagatedGrams(InputGrams):
    """RegMean++: per linear weight, the Gram of its layer's inputs when the calibration text
    flows through the already merged earlier layers (``merging.propagation``). Every model's
    statistics depend on the merge of the layers before, so all models are calibrated together
    (``compute_jointly``) and the cache key includes the recipe; ``tensor_stats`` is RegMean's."""

    name = "gram-propagated"
    description = "the Gram matrices of its linear layers' inputs, propagated through the merged earlier layers"
    joint = True

    def compute_jointly(self, folders: list[Path], examples: list[list[Example]], settings: CalibrationSettings,
                        read, merge, device, progress, cancel) -> list[tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """Per model, its cache file's tensors and metadata. ``read(i, name)``/``merge(name, stats)``:
        the engine's reading and merging of one tensor (named as the first model stores it)."""
        model, _ = load_model(folders[0], device=device, purpose="RegMean++ calibration")
        try:
            tokenizers = [load_tokenizer(folder) for folder in folders]
        except (OSError, ValueError, KeyError) as exc:
            raise MergeStudioError(f"cannot load a tokenizer for RegMean++ calibration: {str(exc).splitlines()[0]}") from None
        stored = _stored_names(folders[0])
        try:
            texts = [encoded_batches(tokenizer, texts, settings.max_length) for tokenizer, texts in zip(tokenizers, examples)]
            results = propagated_grams(model, texts, lambda name: _checkpoint_name(name, stored), read, merge,
                                       list(_linear_layers(model)), progress, cancel)
            return [gram_file(grams, owner, tokens, len(texts), model, stored)
                    for (grams, owner, tokens), texts in zip(results, examples)]
        finally:
            del model


FISHER = DiagonalFisher()
GRAMS = InputGrams()
PROPAGATED_GRAMS = PropagatedGrams()


# -- per model, cached -----------------------------------------------------------------------

def calibrate(kind: CalibrationKind, folder: Path, examples: list[Example], settings: CalibrationSettings, *,
              device: str = "auto", progress: ProgressFn | None = None, cancel=None) -> Path:
    """Compute (or find in the cache) one model's statistics of ``kind``; returns the cache file."""
    path = cache_dir() / f"{kind.name}-{cache_key(kind.name, folder, examples, settings)}.safetensors"
    if _cached(path):
        return path
    model, tokenizer = load_model(folder, device=device, purpose="calibration")
    try:
        tensors, metadata = kind.compute(model, tokenizer, _stored_names(folder), examples, settings, progress, cancel)
        _save_atomically(path, tensors, {"kind": kind.name, **metadata})
    finally:
        del model
    return path


def calibrate_jointly(kind: CalibrationKind, folders: list[Path], examples: list[list[Example]],
                      settings: CalibrationSettings, context: str, read, merge, *, device: str = "auto",
                      progress=None, cancel=None) -> list[Path]:
    """Compute (or find in the cache) every model's statistics of a joint ``kind``; returns the
    cache files in model order. ``context`` (the recipe) is part of the key: the statistics
    depend on how the earlier layers were merged."""
    keys = [cache_key(kind.name, folder, texts, settings) for folder, texts in zip(folders, examples)]
    key = hashlib.sha256(json.dumps([kind.name, keys, context]).encode()).hexdigest()[:32]
    paths = [cache_dir() / f"{kind.name}-{key}-{index}.safetensors" for index in range(len(folders))]
    if all(_cached(path) for path in paths):
        return paths
    files = kind.compute_jointly(folders, examples, settings, read, merge, device, progress, cancel)
    for path, (tensors, metadata) in zip(paths, files):
        _save_atomically(path, tensors, {"kind": kind.name, **metadata})
    return paths


class CalibrationStats:
    """One model's cached statistics, read tensor by tensor beside the weights."""

    def __init__(self, path: Path):
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        self.metadata: dict[str, str] = self._file.metadata() or {}
        self._names = set(self._file.keys())
        self._parsed: dict[str, dict] = {}
        self._last: tuple[str, torch.Tensor] | None = None  # statistics shared by neighbouring tensors: read once

    def close(self) -> None:
        self._file = None
        self._last = None

    def tensor(self, key: str) -> torch.Tensor | None:
        if key not in self._names:
            return None
        if self._last is None or self._last[0] != key:
            self._last = (key, self._file.get_tensor(key))
        return self._last[1]

    def lookup(self, key: str) -> dict:
        """A JSON object stored in the metadata (parsed once)."""
        if key not in self._parsed:
            self._parsed[key] = json.loads(self.metadata.get(key, "{}"))
        return self._parsed[key]
