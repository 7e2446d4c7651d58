"""What a model is, read without loading its weights (the studio's Models tab shows it).

- Local folders (and Hub models already downloaded): tensor names, shapes and dtypes from the
  safetensors headers (``merging.checkpoint.CheckpointReader``), sizes from the files.
- Hub ids: ``config.json`` only (``merging.sources.resolve_model(weights=False)``, a few KB),
  tensor shapes from the Hub's safetensors metadata (headers fetched by range requests),
  file sizes from the repo listing. Nothing large is downloaded to inspect a model.
- Memory: accelerate's estimate, as ``accelerate estimate-memory`` makes it: the model built
  from its config on the meta device (no memory, no weights), measured per dtype.
- Compatibility with the base: the merge engine's own checks (``config_mismatch``,
  ``layout_mismatch``) on what was read, so the verdict is the engine's message.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging.checkpoint import CheckpointReader, safetensors_files
from merging.errors import MergeStudioError
from merging.plan import config_mismatch, layout_mismatch
from merging.runtime import meta_model
from merging import hub
from merging.sources import SourcePolicy, is_hub_ref, resolve_model, snapshot_download, split_revision

Tensors = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)


@dataclass
class ModelInfo:
    ref: str
    architecture: str | None = None
    parameters: int | None = None
    dtypes: list[str] = field(default_factory=list)
    disk_bytes: int | None = None
    memory: dict[str, int] = field(default_factory=dict)  # "float32", "bfloat16", "largest layer" -> bytes
    config: dict = field(default_factory=dict)
    tensors: Tensors = field(default_factory=dict)
    error: str | None = None  # why the model could not be inspected


def describe(ref: str, policy: SourcePolicy = SourcePolicy(), download=snapshot_download) -> ModelInfo:
    """Everything the Models tab shows about ``ref``; failures end up in ``error``, never raised."""
    info = ModelInfo(ref)
    try:
        resolved = resolve_model(ref, policy, download, weights=False)
        info.config = resolved.config
        info.architecture = resolved.architecture
        if safetensors_files(resolved.folder):
            info.tensors, info.disk_bytes = _local_tensors(resolved.folder, ref, policy)
        elif is_hub_ref(ref):
            info.tensors, info.disk_bytes = _hub_tensors(ref, policy)
        else:
            resolve_model(ref, policy, download)  # raises the engine's message (pickles only, no weights)
        floating = [(shape, dtype) for shape, dtype in info.tensors.values() if dtype.startswith(("float", "bfloat"))]
        info.parameters = sum(_numel(shape) for shape, _ in floating)
        info.dtypes = sorted({dtype for _, dtype in floating})
        info.memory = memory_estimate(json.dumps(info.config, sort_keys=True))
    except MergeStudioError as exc:
        info.error = str(exc)
    return info


def compatibility(base: ModelInfo, other: ModelInfo) -> tuple[bool, str]:
    """(compatible, verdict) of ``other`` against ``base``, as the merge engine would judge it."""
    if other.error:
        return False, f"cannot inspect: {other.error}"
    if base.error:
        return False, "the base model cannot be inspected (see its row)"
    if other.ref == base.ref:
        return True, "this is the base model"
    problem = config_mismatch(base, other) or layout_mismatch(
        base.ref, {n: shape for n, (shape, _) in base.tensors.items()},
        other.ref, {n: shape for n, (shape, _) in other.tensors.items()})
    if problem:
        return False, problem
    missing = next((name for name in base.tensors if name not in other.tensors), None)
    if missing:
        return False, f"tensor {missing} of the base is missing here; the checkpoints do not have the same layout"
    note = "" if other.dtypes == base.dtypes else f" (stored as {', '.join(other.dtypes)}; merges compute in float32)"
    return True, "compatible: same architecture, vocabulary and tensor shapes" + note


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _local_tensors(folder: Path, ref: str, policy: SourcePolicy) -> tuple[Tensors, int]:
    reader = CheckpointReader(folder, allow_pickle=policy.allow_pickle, label=ref)
    try:
        tensors = {name: (tuple(reader.info(name).shape), str(reader.info(name).dtype).removeprefix("torch."))
                   for name in reader.names()}
    finally:
        reader.close()
    return tensors, sum(p.stat().st_size for p in safetensors_files(folder))


def _hub_tensors(ref: str, policy: SourcePolicy) -> tuple[Tensors, int | None]:
    tensors = hub.tensors(ref, policy.hub_token)
    repo_id, revision = split_revision(ref)
    try:
        size = hub.weights_bytes(repo_id, revision, policy.hub_token)
    except MergeStudioError:
        size = None
    return tensors, size


@functools.lru_cache(maxsize=64)
def memory_estimate(config_json: str) -> dict[str, int]:
    """accelerate's estimate of the weights' memory, per dtype, from the config alone.

    The model is built on the meta device (``merging.runtime.meta_model``: no memory, no
    weights), as ``accelerate estimate-memory`` does; cached per config, since the same models
    are inspected again and again.
    """
    # Deferred: accelerate takes a second to import, and only the studio's Models tab needs it.
    from accelerate.utils import calculate_maximum_sizes, compute_module_sizes

    model = meta_model(json.loads(config_json))
    if model is None:  # an architecture transformers does not know: no estimate, not an error
        return {}
    _total, (largest, _names) = calculate_maximum_sizes(model)
    return {
        "float32": compute_module_sizes(model, dtype=torch.float32)[""],
        "bfloat16": compute_module_sizes(model, dtype=torch.bfloat16)[""],
        "largest layer": largest,
    }
