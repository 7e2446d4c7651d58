"""Redundancy statistics of task vectors, streamed through the checkpoints one tensor at a time.

For a base θ_base and fine-tuned models θ₁ … θ_M, with task vectors δᵢ = θᵢ − θ_base, per
tensor, per layer and for the whole model:

- ‖δᵢ‖₂ and ‖δᵢ‖₂ / ‖θ_base‖₂ (how far fine-tuning moved the weights, relatively);
- quantiles of |δᵢ| and the share of ‖δᵢ‖² held by its top 1/5/10/20% entries (DARE,
  https://arxiv.org/abs/2311.03099: the delta is highly redundant; TIES,
  https://arxiv.org/abs/2306.01708: a few large entries carry it);
- sign conflicts: the fraction of entries where the non-zero deltas of two or more models
  disagree in sign, before and after trimming each δᵢ to its top-``density`` magnitudes per
  tensor (TIES's trim, ``merging.methods.kernels.magnitude_keep``);
- pairwise cosine similarity cos(δᵢ, δⱼ) = ⟨δᵢ, δⱼ⟩ / (‖δᵢ‖‖δⱼ‖).

A layer is the integer after ``layers.`` or ``h.`` in a tensor name; embeddings, the final
norm and an untied ``lm_head`` are groups of their own. Only one tensor per model is in memory
at a time (read with ``merging``'s reader, computed on the chosen device in float32 chunks), so
memory stays bounded like a merge's. Results are plain dataclasses that round-trip to JSON.
"""

from __future__ import annotations

import math
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable

import torch

from merging.adapters import open_reader
from merging.checkpoint import CheckpointReader, damaged_source
from merging.errors import CheckpointError, MergeCancelled, MergeStudioError, check_cancel
from merging.methods.kernels import TaskVector, chunks, magnitude_keep
from merging.runtime import pick_device
from merging.sources import ResolvedModel, SourcePolicy, resolve_model
from viz.measures import (
    QUANTILES,
    TOP_FRACTIONS,
    MagnitudeProfile,
    MagnitudeProfiler,
    sample_positions,
    sign_conflict_counts,
    weighted_quantiles,
)
from viz.results import (
    DEFINITIONS,
    ConflictStats,
    DeltaStats,
    GroupStats,
    Histogram,
    RedundancyStats,
    number_key,
)

ProgressFn = Callable[[int, int, str], None]  # (tensors done, total, tensor name), like merge()
LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
HISTOGRAM_BINS_PER_DECADE = 10
HISTOGRAM_DECADES = 12  # the histogram spans at most 12 decades below the largest |δ|


def tensor_group(name: str) -> tuple[str, int | None]:
    """(group, layer index): ('layer 3', 3) for 'model.layers.3.mlp...' or 'h.3...', else
    ('embeddings' | 'final norm' | 'lm_head' | 'other', None)."""
    match = LAYER.search(name)
    if match:
        return f"layer {match.group(1)}", int(match.group(1))
    if "lm_head" in name:
        return "lm_head", None
    if any(part in name for part in ("embed", "wte", "wpe")):
        return "embeddings", None
    if "norm" in name or "ln_f" in name:
        return "final norm", None
    return "other", None


# -- measuring --------------------------------------------------------------------------------

@dataclass
class _TensorResult:
    """The raw sums of one tensor, before they are turned into statistics or added into groups."""

    name: str
    shape: list[int]
    base_sumsq: float
    profiles: list[MagnitudeProfile]
    conflicts: list[int] | None  # [eligible, conflicts, trimmed eligible, trimmed conflicts]
    dots: dict[tuple[int, int], float]


def _measure_tensor(name: str, base_reader, readers, density: float, device: torch.device) -> _TensorResult:
    """Stream one tensor of the base and of every model through the measures, chunk by chunk."""
    base = base_reader.get(name).to(device)
    models = [reader.get(name).to(device) for reader in readers]
    n = base.numel()
    deltas = [TaskVector(x, base) for x in models]
    active = [i for i, x in enumerate(models) if not torch.equal(x, base)]  # untouched tensors cost nothing more
    positions = sample_positions(n, device)
    profilers = {i: MagnitudeProfiler(deltas[i], positions) for i in active}
    measure_conflicts = len(models) >= 2
    # TIES trims each task vector to its top-density magnitudes (the engine's own trim)
    keeps = {i: magnitude_keep(deltas[i], density) for i in active} if len(active) >= 2 and density < 1 else {}
    counts = [0, 0, 0, 0]
    dots = {pair: 0.0 for pair in combinations(range(len(models)), 2)}
    base_sumsq = 0.0
    flat_base = base.reshape(-1)
    for part in chunks(n, device):
        b = flat_base[part].float()
        base_sumsq += b.square().sum().item()  # a cascaded sum, not a BLAS dot: ~1e-7 relative, not ~1e-5
        current = {i: deltas[i].chunk(part) for i in active}
        for i in active:
            profilers[i].add(current[i])
        for i, j in combinations(active, 2):
            dots[(i, j)] += torch.mul(current[i], current[j]).sum().item()
        if len(active) >= 2:
            conflicts, eligible = sign_conflict_counts(list(current.values()))
            trimmed = [c * keeps[i](part, c) for i, c in current.items()] if keeps else list(current.values())
            trimmed_conflicts, trimmed_eligible = sign_conflict_counts(trimmed)
            for index, value in enumerate((eligible, conflicts, trimmed_eligible, trimmed_conflicts)):
                counts[index] += value
    profiles = [profilers[i].finish() if i in profilers else MagnitudeProfile.zero(n) for i in range(len(models))]
    if not all(math.isfinite(x) for x in [base_sumsq, *(p.sumsq for p in profiles)]):
        sources = [(reader.label, tensor) for reader, tensor in [(base_reader, base), *zip(readers, models)]]
        raise CheckpointError(damaged_source(name, sources) or
                              f"the deltas of tensor {name} overflow float32; the models are too far apart to compare")
    return _TensorResult(name, list(base.shape), base_sumsq, profiles, counts if measure_conflicts else None, dots)


def _delta_stats(numel: int, base_sumsq: float, profiles: list[MagnitudeProfile], quantiles: dict[float, float]) -> DeltaStats:
    """One model's DeltaStats from the profiles of the tensors of a group (one, for a tensor)."""
    sumsq = sum(p.sumsq for p in profiles)
    nonzero = sum(p.nonzero for p in profiles)
    return DeltaStats(
        numel=numel,
        norm=sumsq ** 0.5,
        relative_norm=(sumsq / base_sumsq) ** 0.5 if base_sumsq > 0 else None,
        mean_abs=sum(p.abs_sum for p in profiles) / numel if numel else 0.0,
        zero_fraction=1.0 - nonzero / numel if numel else 0.0,
        quantiles={number_key(q): v for q, v in quantiles.items()},
        energy_top={number_key(f): (sum(p.top_energy[f] for p in profiles) / sumsq if sumsq > 0 else None) for f in TOP_FRACTIONS},
    )


def _cosines(labels: list[str], sumsq: list[float], dots: dict[tuple[int, int], float]) -> dict[str, dict[str, float | None]]:
    out = {a: {} for a in labels}
    for i, a in enumerate(labels):
        out[a][a] = 1.0 if sumsq[i] > 0 else None
    for (i, j), dot in dots.items():
        denominator = (sumsq[i] * sumsq[j]) ** 0.5
        value = max(-1.0, min(1.0, dot / denominator)) if denominator > 0 else None
        out[labels[i]][labels[j]] = out[labels[j]][labels[i]] = value
    return out


def _pool(profiles: list[MagnitudeProfile]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled |δ| samples of several tensors and their weights (entries each sample stands for)."""
    values = [p.sample.float().cpu() for p in profiles]
    weights = [torch.full((v.numel(),), p.numel / max(1, v.numel()), dtype=torch.float64) for v, p in zip(values, profiles)]
    return torch.cat(values), torch.cat(weights)


def _tensor_stats(result: _TensorResult, labels: list[str]) -> GroupStats:
    n = result.profiles[0].numel
    group, layer = tensor_group(result.name)
    return GroupStats(
        name=result.name, layer=layer, numel=n, base_norm=result.base_sumsq ** 0.5,
        deltas={label: _delta_stats(n, result.base_sumsq, [p], {q: p.quantile(q) for q in QUANTILES})
                for label, p in zip(labels, result.profiles)},
        conflicts=ConflictStats(n, *result.conflicts) if result.conflicts is not None else None,
        cosine=_cosines(labels, [p.sumsq for p in result.profiles], result.dots),
        group=group, shape=result.shape,
    )


def _group_stats(name: str, layer: int | None, results: list[_TensorResult], labels: list[str]) -> GroupStats:
    numel = sum(r.profiles[0].numel for r in results)
    base_sumsq = sum(r.base_sumsq for r in results)
    deltas = {}
    for i, label in enumerate(labels):
        profiles = [r.profiles[i] for r in results]
        quantiles = weighted_quantiles(*_pool(profiles), QUANTILES)
        quantiles[1.0] = max(p.maximum for p in profiles)  # exact, unlike a sample's largest
        deltas[label] = _delta_stats(numel, base_sumsq, profiles, quantiles)
    conflicts = None
    if results[0].conflicts is not None:
        conflicts = ConflictStats(numel, *[sum(r.conflicts[k] for r in results) for k in range(4)])
    dots = {pair: sum(r.dots[pair] for r in results) for pair in results[0].dots}
    sumsq = [sum(r.profiles[i].sumsq for r in results) for i in range(len(labels))]
    return GroupStats(name, layer, numel, base_sumsq ** 0.5, deltas, conflicts, _cosines(labels, sumsq, dots))


def _histogram(results: list[_TensorResult], labels: list[str]) -> Histogram:
    """Log-spaced histogram of |δ| per model from the weighted samples (zeros counted apart)."""
    pools = [_pool([r.profiles[i] for r in results]) for i in range(len(labels))]
    positive = [v[v > 0] for v, _ in pools]
    top = max((p.max().item() for p in positive if p.numel()), default=0.0)
    if top <= 0:
        return Histogram([], {label: [] for label in labels}, {label: 1.0 for label in labels})
    bottom = min(p.min().item() for p in positive if p.numel())
    high = math.ceil(math.log10(top))
    # at least one decade: when every |δ| is one power of ten (a norm weight 1 -> 2), high = low
    low = min(high - 1, max(high - HISTOGRAM_DECADES, math.floor(math.log10(bottom))))
    edges = torch.logspace(low, high, (high - low) * HISTOGRAM_BINS_PER_DECADE + 1, dtype=torch.float64)
    fractions, zeros = {}, {}
    total = sum(r.profiles[0].numel for r in results)
    for i, label in enumerate(labels):
        values, weights = pools[i]
        nonzero = values > 0
        counts, _ = torch.histogram(values[nonzero].double().clamp(min=edges[0].item()), edges, weight=weights[nonzero])
        zeros[label] = 1.0 - sum(r.profiles[i].nonzero for r in results) / total
        # the sample gives the shape; the exact count of non-zero entries gives the total
        fractions[label] = (counts * ((1.0 - zeros[label]) / max(counts.sum().item(), 1e-300))).tolist()
    return Histogram(edges.tolist(), fractions, zeros)


# -- models -----------------------------------------------------------------------------------

def model_labels(refs: list[str]) -> list[str]:
    """Short unique labels: a folder's name or a Hub id's name; repeats get ' (2)', ' (3)' …"""
    labels = []
    for ref in refs:
        name = ref.rstrip("/\\").split("@")[0].replace("\\", "/").rsplit("/", 1)[-1] or ref
        label, n = name, 2
        while label in labels:
            label, n = f"{name} ({n})", n + 1
        labels.append(label)
    return labels


def _open(base: str, finetuned: list[str], policy: SourcePolicy, resolver) -> tuple[ResolvedModel, list[ResolvedModel]]:
    base_model = resolver(str(base), policy)
    models = [resolver(str(ref), policy) for ref in finetuned]
    for model in models:
        if model.architecture != base_model.architecture:
            raise CheckpointError(
                f"architectures differ: {base_model.ref} is {base_model.architecture} but {model.ref} is "
                f"{model.architecture}; task vectors exist only between models of the same architecture"
            )
    return base_model, models


def _plan(base_reader: CheckpointReader, readers: list[CheckpointReader]) -> list[str]:
    """The floating-point tensors of the base, checked present with the same shape in every model."""
    names = []
    known = set(base_reader.names())
    for reader in readers:
        stray = next((n for n in reader.names() if n not in known), None)
        if stray is not None:
            raise CheckpointError(f"tensor {stray} is in {reader.label} but not in the base {base_reader.label}; "
                                  "the checkpoints do not have the same layout")
    for name in base_reader.names():
        info = base_reader.info(name)
        if not info.dtype.is_floating_point:
            continue
        for reader in readers:
            if name not in reader:
                raise CheckpointError(f"tensor {name} is missing from {reader.label}; the checkpoints do not have the same layout")
            shape = reader.info(name).shape
            if shape != info.shape:
                raise CheckpointError(
                    f"tensor {name} has shape {list(info.shape)} in the base {base_reader.label} but {list(shape)} in "
                    f"{reader.label}; task vectors need models of the same shape"
                )
        names.append(name)
    return names


@contextmanager
def _cpu_threads(count: int | None):
    """The calling thread's torch intra-op threads set to ``count`` for the block, then restored
    (torch keeps the count per thread, so it is read, set and restored in this one)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(previous)


def _group_order(item: tuple[str, int | None]) -> tuple:
    name, layer = item
    rank = {"embeddings": 0, "final norm": 2, "lm_head": 3, "other": 4}
    return (1, layer, name) if layer is not None else (rank.get(name, 4), -1, name)


def delta_statistics(
    base: str | Path,
    finetuned: list[str | Path],
    *,
    density: float = 0.2,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    policy: SourcePolicy = SourcePolicy(),
    labels: list[str] | None = None,
    threads: int | None = None,
    resolver=resolve_model,
) -> RedundancyStats:
    """Redundancy statistics of the task vectors of ``finetuned`` models on ``base``.

    Models are local folders or Hub ids (``merging.sources.resolve_model`` under ``policy``:
    safetensors only by default). ``density`` is the TIES trim applied before the second sign
    conflict count. ``progress(done, total, tensor)`` is called after each tensor; setting
    ``cancel`` stops with MergeCancelled. ``threads`` sets torch's intra-op CPU threads while
    measuring and restores them after; None leaves them. torch keeps that count per thread: it
    holds for the calling thread (a UI worker, say) and for threads that first use torch
    meanwhile, not for threads that already ran torch ops, such as the main thread. The pass
    is thousands of small chunked ops, and on a CPU that other work keeps busy every
    multi-threaded op waits for its descheduled second thread: with 1 thread the demo family
    took 8 s here, with 2 over 45 s.
    Raises MergeStudioError subclasses for bad input.
    """
    started = time.perf_counter()
    if not finetuned:
        raise MergeStudioError("give at least one fine-tuned model besides the base")
    if not 0.0 < float(density) <= 1.0:
        raise MergeStudioError(f"density {density} is out of range; it is the fraction kept by trimming, in (0, 1]")
    labels = list(labels) if labels is not None else model_labels([str(ref) for ref in finetuned])
    if len(labels) != len(finetuned) or len(set(labels)) != len(labels):
        raise MergeStudioError("give one unique label per fine-tuned model")
    compute = pick_device(device)
    base_model, models = _open(str(base), [str(ref) for ref in finetuned], policy, resolver)
    readers: list[CheckpointReader] = []
    try:
        base_reader = open_reader(base_model, label=base_model.ref)
        readers.append(base_reader)
        for model in models:
            readers.append(open_reader(model, label=model.ref))  # a BASE+ADAPTER model: the adapter applied
        names = _plan(base_reader, readers[1:])
        results = []
        with torch.inference_mode(), _cpu_threads(threads if compute.type == "cpu" else None):
            for index, name in enumerate(names):
                check_cancel(cancel, "statistics cancelled", MergeCancelled)
                results.append(_measure_tensor(name, base_reader, readers[1:], float(density), compute))
                if progress is not None:
                    progress(index + 1, len(names), name)
    finally:
        for reader in readers:
            reader.close()
    if not results:
        raise CheckpointError(f"{base_model.ref} has no floating-point tensors to compare")

    groups: dict[tuple[str, int | None], list[_TensorResult]] = {}
    for result in results:
        groups.setdefault(tensor_group(result.name), []).append(result)
    return RedundancyStats(
        base=str(base),
        models=dict(zip(labels, [str(ref) for ref in finetuned])),
        density=float(density),
        device=str(compute),
        seconds=round(time.perf_counter() - started, 3),
        tensors=[_tensor_stats(r, labels) for r in results],
        layers=[_group_stats(name, layer, groups[(name, layer)], labels) for name, layer in sorted(groups, key=_group_order)],
        model=_group_stats("model", None, results, labels),
        histogram=_histogram(results, labels),
        definitions=dict(DEFINITIONS),
    )


__all__ = [
    "ConflictStats", "DeltaStats", "GroupStats", "Histogram", "ProgressFn", "RedundancyStats",
    "delta_statistics", "model_labels", "tensor_group",
]
