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
- pairwise cosine similarity cos(δᵢ, δⱼ) = ⟨δᵢ, δⱼ⟩ / (‖δᵢ‖‖δⱼ‖);
- for 2-D weight matrices, singular values (``viz.spectral``): the spectra of each δᵢ, of Σδᵢ and
  of a merged model's update, the share of ‖δ‖²_F in the top 1/5/10% of singular values (how
  low-rank fine-tuning is), and the overlap of the tasks' top singular subspaces, before and
  after merging.

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
    SpectralStats,
    Spectrum,
    number_key,
)
from viz.spectral import SV_FRACTIONS, Factors, MatrixSpectra, is_matrix, measure_matrix, pooled, spectrum_positions

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
    spectral: MatrixSpectra | None = None
    spectral_seconds: float = 0.0


def _measure_tensor(name: str, base_reader, readers, density: float, device: torch.device,
                    merged_reader=None, spectra: bool = True) -> _TensorResult:
    """Stream one tensor of the base and of every model through the measures, chunk by chunk;
    then, for a weight matrix, its singular values (with the merged model's, if given)."""
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
    result = _TensorResult(name, list(base.shape), base_sumsq, profiles, counts if measure_conflicts else None, dots)
    if spectra and is_matrix(base.shape):
        started = time.perf_counter()
        merged = None
        if merged_reader is not None:
            merged = merged_reader.get(name).to(device)
            if not bool(torch.isfinite(merged).all()):
                raise CheckpointError(damaged_source(name, [(merged_reader.label, merged)]) or
                                      f"tensor {name} of {merged_reader.label} is not finite")
        result.spectral = measure_matrix(base, models, merged)
        result.spectral_seconds = time.perf_counter() - started
    return result


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
        spectral=_spectral_stats([result.spectral], labels) if result.spectral is not None else None,
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
    matrices = [r.spectral for r in results if r.spectral is not None]
    return GroupStats(name, layer, numel, base_sumsq ** 0.5, deltas, conflicts, _cosines(labels, sumsq, dots),
                      spectral=_spectral_stats(matrices, labels) if matrices else None)


# -- singular values ----------------------------------------------------------------------------

def _significant(x: float) -> float:
    return float(f"{x:.6g}")  # float32 values hold ~7 digits; 6 keep stats.json small


def _spectrum(factors: list[Factors]) -> Spectrum:
    """One matrix's spectrum, or several pooled (a layer's, the model's), as stored."""
    complete = all(f.complete for f in factors)
    ranks = [f.numerical_rank for f in factors]
    rank = sum(ranks) if complete and None not in ranks else None
    values = pooled([f.values for f in factors])
    values = values[values > 0]
    positions = spectrum_positions(values.numel(), (rank, rank + 1) if rank else ())
    return Spectrum(
        rank=sum(f.rank for f in factors),
        known=sum(f.rank if f.sumsq == 0 else f.values.numel() for f in factors),
        complete=complete, numerical_rank=rank, index=positions,
        values=[_significant(float(values[p - 1])) for p in positions],
    )


def _energy(factors: list[Factors]) -> dict[str, float | None]:
    """Share of Σ‖δ‖²_F held by each matrix's top f of singular values, summed over the matrices."""
    total = sum(f.sumsq for f in factors)
    return {number_key(fraction): (sum(f.top_energy(fraction) for f in factors) / total if total > 0 else None)
            for fraction in SV_FRACTIONS}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pair_maps(matrices: list[MatrixSpectra], labels: list[str], side: str) -> dict[str, dict[str, float | None]]:
    """label -> label -> the mean over matrices of one overlap ("left", "merged_left", ...)."""
    out = {a: {} for a in labels}
    for i, a in enumerate(labels):
        out[a][a] = 1.0 if any(m.tasks[i].sumsq > 0 for m in matrices) else None
        for j in range(i + 1, len(labels)):
            values = [getattr(m.pairs[(i, j)], side) for m in matrices if (i, j) in m.pairs]
            out[a][labels[j]] = out[labels[j]][a] = _mean([v for v in values if v is not None])
    return out


def _spectral_stats(matrices: list[MatrixSpectra], labels: list[str]) -> SpectralStats:
    """The singular-value statistics of one matrix, or of a group's matrices together."""
    tasks = [[m.tasks[i] for m in matrices] for i in range(len(labels))]
    pairs = [(m, pair) for m in matrices for pair in m.pairs.values()]
    stats = SpectralStats(
        matrices=len(matrices),
        spectra={label: _spectrum(factors) for label, factors in zip(labels, tasks)},
        energy_top={label: _energy(factors) for label, factors in zip(labels, tasks)},
        overlap_left=_pair_maps(matrices, labels, "left"),
        overlap_right=_pair_maps(matrices, labels, "right"),
        chance_left=_mean([p.k / m.shape[0] for m, p in pairs]),
        chance_right=_mean([p.k / m.shape[1] for m, p in pairs]),
    )
    if matrices[0].total is not None:
        stats.sum_spectrum = _spectrum([m.total for m in matrices])
        stats.sum_energy_top = _energy([m.total for m in matrices])
    if matrices[0].merged is not None:
        stats.merged_spectrum = _spectrum([m.merged for m in matrices])
        stats.merged_energy_top = _energy([m.merged for m in matrices])
        if len(labels) >= 2:
            stats.merged_overlap_left = _pair_maps(matrices, labels, "merged_left")
            stats.merged_overlap_right = _pair_maps(matrices, labels, "merged_right")
        stats.merged_alignment = {}
        for i, label in enumerate(labels):
            kept = [(m.aligned[i], m.tasks[i].sumsq) for m in matrices if m.aligned[i] is not None]
            total = sum(energy for _, energy in kept)
            stats.merged_alignment[label] = min(1.0, (sum(a for a, _ in kept) / total) ** 0.5) if total > 0 else None
    return stats


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
    for model in models:  # (a merged model is one of these too: the last, when given)
        if model.architecture != base_model.architecture:
            raise CheckpointError(
                f"architectures differ: {base_model.ref} is {base_model.architecture} but {model.ref} is "
                f"{model.architecture}; task vectors exist only between models of the same architecture"
            )
    return base_model, models


def _check_merged(base_reader: CheckpointReader, merged_reader: CheckpointReader, names: list[str]) -> None:
    """A merged model needs every weight matrix of the base, with the same shape (more tensors are
    fine: it may store an lm_head its sources tie)."""
    for name in names:
        shape = base_reader.info(name).shape
        if not is_matrix(shape):
            continue
        if name not in merged_reader:
            raise CheckpointError(f"tensor {name} is missing from the merged model {merged_reader.label}; "
                                  "compare a merge of these models")
        if merged_reader.info(name).shape != shape:
            raise CheckpointError(f"tensor {name} has shape {list(shape)} in the base but "
                                  f"{list(merged_reader.info(name).shape)} in the merged model {merged_reader.label}")


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
    merged: str | Path | None = None,
    merged_label: str | None = None,
    spectra: bool = True,
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
    ``spectra`` adds the singular-value statistics of every 2-D weight matrix (``viz.spectral``);
    ``merged`` (a merge of these models, read like them) adds its update θ_merged − θ_base to
    them, labelled ``merged_label`` (default: from its reference, like the models').
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
    if merged is not None and not spectra:
        raise MergeStudioError("a merged model is compared in the singular-value statistics; leave them on to give one")
    compute = pick_device(device)
    refs = [str(ref) for ref in finetuned] + ([str(merged)] if merged is not None else [])
    base_model, models = _open(str(base), refs, policy, resolver)
    readers: list[CheckpointReader] = []
    try:
        base_reader = open_reader(base_model, label=base_model.ref)
        readers.append(base_reader)
        for model in models:
            readers.append(open_reader(model, label=model.ref))  # a BASE+ADAPTER model: the adapter applied
        sources, merged_reader = (readers[1:-1], readers[-1]) if merged is not None else (readers[1:], None)
        names = _plan(base_reader, sources)
        if merged_reader is not None:
            _check_merged(base_reader, merged_reader, names)
        results = []
        with torch.inference_mode(), _cpu_threads(threads if compute.type == "cpu" else None):
            for index, name in enumerate(names):
                check_cancel(cancel, "statistics cancelled", MergeCancelled)
                results.append(_measure_tensor(name, base_reader, sources, float(density), compute, merged_reader, spectra))
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
        merged=str(merged) if merged is not None else None,
        merged_label=(merged_label or model_labels([str(merged)])[0]) if merged is not None else None,
        spectral_seconds=round(sum(r.spectral_seconds for r in results), 3) if spectra else None,
    )


__all__ = [
    "ConflictStats", "DeltaStats", "GroupStats", "Histogram", "ProgressFn", "RedundancyStats",
    "delta_statistics", "model_labels", "tensor_group",
]
