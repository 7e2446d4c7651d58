"""The merge engine: resolve, check, plan, then stream every tensor through its method.

Peak memory is about two tensors per input model in their stored dtype (the one being merged
and the next, read on a background thread while the current one is computed) plus one float32
result and a few MB of chunk scratch: methods widen inputs chunk by chunk, and the writer
streams each result straight into its shard. Tensors are read with preadv, not memory-mapped,
so pages of tensors already merged do not stay in the process's memory.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from merging.checkpoint import (
    CheckpointReader,
    StreamingWriter,
    TensorInfo,
    atomic_output,
    check_output_dir,
    copy_support_files,
    parse_size,
)
from merging.errors import CheckpointError, MergeCancelled, MergeStudioError
from merging.methods import get_method
from merging.model_card import write_model_card
from merging.recipe import Recipe, resolve
from merging.sources import ResolvedModel, SourcePolicy, resolve_model

ProgressFn = Callable[[int, int, str], None]
CalibrationProgressFn = Callable[[str, int, int], None]  # (model reference, examples done, total)
LAYER_INDEX = re.compile(r"\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class MergeResult:
    output: Path
    method: str
    seconds: float
    tensors: int
    bytes_written: int
    shards: int
    dtype: str
    device: str

    def summary(self) -> dict:
        return {
            "output": str(self.output), "method": self.method, "seconds": round(self.seconds, 3),
            "tensors": self.tensors, "bytes": self.bytes_written, "shards": self.shards,
            "dtype": self.dtype, "device": self.device,
        }


@dataclass
class TensorPlan:
    """One output tensor: how it is made, and where it sits among the layers (``t``)."""

    out: TensorInfo
    merged: bool  # False: copied from the reference model (non-float, or present only there)
    t: float = 0.0


@dataclass
class _Inputs:
    """The resolved models of a recipe and their open readers."""

    reference: ResolvedModel  # config source: the base, else the first input
    base: ResolvedModel | None
    inputs: list[ResolvedModel]
    tokenizer: ResolvedModel
    readers: dict[str, CheckpointReader] = field(default_factory=dict)

    def reader(self, model: ResolvedModel) -> CheckpointReader:
        return self.readers[model.ref]

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeStudioError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MergeStudioError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def tensor_seed(seed: int, name: str) -> int:
    """A seed for a tensor's random steps, from the recipe seed and the tensor name only.

    Independent of order and device, so a merge is reproducible however it is run.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 8  # leaves room for + model index


def open_inputs(recipe: Recipe, policy: SourcePolicy, resolver=resolve_model) -> _Inputs:
    """Resolve every model of the recipe, checking configs before any weights are fetched.

    A first round reads only config files (for Hub models, a few KB), so incompatible
    architectures or vocabularies are reported before a long download; the second resolves
    the weights.
    """
    models = _resolve_all(recipe, lambda ref: resolver(ref, policy, weights=False))
    check_configs(models)
    models = _resolve_all(recipe, lambda ref: resolver(ref, policy))
    try:
        for model in {m.ref: m for m in [models.reference, *models.inputs]}.values():
            models.readers[model.ref] = CheckpointReader(model.folder, allow_pickle=policy.allow_pickle, label=model.ref)
    except BaseException:
        models.close()
        raise
    return models


def _resolve_all(recipe: Recipe, resolve_one) -> _Inputs:
    cache: dict[str, ResolvedModel] = {}

    def get(ref: str) -> ResolvedModel:
        if ref not in cache:
            cache[ref] = resolve_one(ref)
        return cache[ref]

    base = get(recipe.base_model) if recipe.base_model else None
    inputs = [get(entry.model) for entry in recipe.input_entries()]
    reference = base or inputs[0]
    tokenizer = reference if recipe.tokenizer_source in (None, "base") else get(recipe.tokenizer_source)
    return _Inputs(reference, base, inputs, tokenizer)


def check_configs(models: _Inputs) -> None:
    """Architecture and vocabulary checks from config.json alone, before any weight is read."""
    for other in models.inputs:
        problem = config_mismatch(models.reference, other)
        if problem:
            raise CheckpointError(problem)


def config_mismatch(ref, other) -> str | None:
    """Why ``other`` cannot be merged with ``ref`` judging by their configs, or None.

    Both have ``.ref``, ``.architecture`` and ``.config`` (a ResolvedModel, or the studio's
    model description), so the Models tab gives the engine's verdict word for word.
    """
    if other.architecture != ref.architecture:
        return (
            f"architectures differ: {ref.ref} is {ref.architecture} but {other.ref} is "
            f"{other.architecture}; only models of the same architecture can be merged"
        )
    ours, theirs = ref.config.get("vocab_size"), other.config.get("vocab_size")
    if ours is not None and theirs is not None and ours != theirs:
        return vocabulary_message(ref.ref, ours, other.ref, theirs)
    return None


def layout_mismatch(ref_label: str, ref_shapes: dict, other_label: str, other_shapes: dict) -> str | None:
    """Why two checkpoints' tensors (name -> shape) cannot be merged: a tensor only ``other``
    has, or a shape that differs; None when they fit. (Tensors only the reference has are
    judged by the caller: the engine copies them when no input has them.)"""
    stray = next((name for name in other_shapes if name not in ref_shapes), None)
    if stray is not None:
        return f"tensor {stray} is in {other_label} but not in {ref_label}; the checkpoints do not have the same layout"
    for name, shape in ref_shapes.items():
        theirs = other_shapes.get(name)
        if theirs is None or tuple(theirs) == tuple(shape):
            continue
        if _is_vocabulary_tensor(name) and tuple(theirs[1:]) == tuple(shape[1:]):
            return vocabulary_message(ref_label, shape[0], other_label, theirs[0])
        return (
            f"tensor {name} has shape {list(shape)} in {ref_label} but {list(theirs)} in {other_label}; "
            "these models cannot be merged"
        )
    return None


def vocabulary_message(ref_a: str, size_a, ref_b: str, size_b) -> str:
    return (
        f"vocabulary sizes differ: {ref_a} has {size_a} tokens, {ref_b} has {size_b}. Merging models "
        "with different vocabularies (tokenizer merging) is not supported yet. Merge only fine-tunes "
        "that kept the base's tokenizer; the output takes the tokenizer of the base model, or of the "
        "model named by 'tokenizer_source', which must have the same vocabulary size."
    )


def plan_tensors(recipe: Recipe, models: _Inputs) -> list[TensorPlan]:
    """Check every tensor of every input against the reference and decide how each is made."""
    ref_reader = models.reader(models.reference)
    out_dtype = recipe.output_dtype
    num_layers = _layer_count(models.reference.config, ref_reader.names())
    input_readers = [(m, models.reader(m)) for m in models.inputs]
    names = ref_reader.names()
    ref_shapes = {name: ref_reader.info(name).shape for name in names}
    for model, reader in input_readers:
        problem = layout_mismatch(models.reference.ref, ref_shapes, model.ref, {n: reader.info(n).shape for n in reader.names()})
        if problem:
            raise CheckpointError(problem)
    plans = []
    for name in names:
        info = ref_reader.info(name)
        present = [(m, r) for m, r in input_readers if name in r]
        if present and len(present) < len(input_readers):
            missing = next(m for m, r in input_readers if name not in r)
            raise CheckpointError(f"tensor {name} is missing from {missing.ref}; the checkpoints do not have the same layout")
        floating = info.dtype.is_floating_point
        merged = bool(present) and floating
        dtype = (out_dtype or info.dtype) if floating else info.dtype
        plans.append(TensorPlan(TensorInfo(name, info.shape, dtype), merged, _layer_position(name, num_layers)))
    return plans


def _is_vocabulary_tensor(name: str) -> bool:
    return any(part in name for part in ("embed", "lm_head", "wte", "word_embeddings", "output.weight"))


def _layer_count(config: dict, names: list[str]) -> int:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    indices = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))]
    return max(indices) + 1 if indices else 1


def _layer_position(name: str, num_layers: int) -> float:
    """mergekit's gradient position: layer i of N is at i/(N-1); other tensors at 0."""
    match = LAYER_INDEX.search(name)
    if not match:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def resolve_parameters(recipe: Recipe, plan: TensorPlan) -> tuple[list[dict], dict]:
    """Per-model and global parameter values for one tensor (model entry, then global, then default)."""
    spec = recipe.method
    name = plan.out.name

    def value(param, *scopes):
        for scope in scopes:
            if param.name in scope:
                result = resolve(scope[param.name], param, name, plan.t)
                if result is not None:
                    return result
        return param.default

    global_values = {p.name: value(p, recipe.parameters) for p in spec.global_params()}
    per_model = [
        {p.name: value(p, entry.parameters, recipe.parameters) for p in spec.model_params()}
        for entry in recipe.input_entries()
    ]
    return per_model, global_values


def merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    shard_size: str | int = "2GB",
    policy: SourcePolicy = SourcePolicy(),
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    resolver=resolve_model,
    calibration_progress: CalibrationProgressFn | None = None,
) -> MergeResult:
    """Merge the recipe's models into ``out_dir`` (a from_pretrained-loadable folder).

    Data-aware methods (Fisher, RegMean) first run each model on its calibration text (one
    model in memory at a time, results cached), then stream like every other method.
    Raises a MergeStudioError subclass with a user-facing message on any bad input, and
    MergeCancelled if ``cancel`` is set; in every failure no output folder is left behind.
    """
    started = time.perf_counter()
    compute = pick_device(device)
    max_shard = parse_size(shard_size)
    method = get_method(recipe.merge_method)
    check_output_dir(Path(out_dir), overwrite=overwrite)  # before any download
    models = open_inputs(recipe, policy, resolver)
    stats = None
    try:
        plans = plan_tensors(recipe, models)
        stats = calibrate_inputs(recipe, models, policy, device, calibration_progress, cancel)
        protected = [m.folder for m in [models.reference, models.tokenizer, *models.inputs]]
        with atomic_output(Path(out_dir), overwrite=overwrite, protected=protected) as temp:
            writer = StreamingWriter(temp, [p.out for p in plans], max_shard)
            try:
                _stream(recipe, method, models, plans, writer, compute, progress, cancel, stats)
                shards = writer.finish()
                copy_support_files(models.reference.folder, models.tokenizer.folder, temp, recipe.output_dtype)
                write_model_card(temp, recipe)
            except OSError as exc:
                raise CheckpointError(
                    f"writing the merged model failed: {exc.strerror or exc}"
                    + (" (disk full: free some space or choose another output folder)" if exc.errno == 28 else "")
                ) from None
            finally:
                writer.abort()
    finally:
        models.close()
        for entry in stats or []:
            entry.close()
    out = Path(out_dir).expanduser().absolute()
    return MergeResult(
        output=out,
        method=recipe.merge_method,
        seconds=time.perf_counter() - started,
        tensors=len(plans),
        bytes_written=sum(p.out.nbytes for p in plans),
        shards=len(shards),
        dtype=written_dtype(plans),
        device=str(compute),
    )


def written_dtype(plans: list[TensorPlan]) -> str:
    """The floating dtype(s) the output holds, largest share first: ``bfloat16``, or
    ``bfloat16/float32`` when a model keeps some tensors wider (what "as base" resolves to)."""
    sizes: dict[str, int] = {}
    for plan in plans:
        if plan.out.dtype.is_floating_point:
            name = str(plan.out.dtype).removeprefix("torch.")
            sizes[name] = sizes.get(name, 0) + plan.out.nbytes
    return "/".join(sorted(sizes, key=sizes.get, reverse=True)) or "none"


def calibrate_inputs(recipe: Recipe, models: _Inputs, policy: SourcePolicy, device: str,
                     progress: CalibrationProgressFn | None, cancel) -> list | None:
    """Per input model, its cached calibration statistics (computed now if missing), or None
    for methods that need no data."""
    from merging.calibration import CalibrationSettings, CalibrationStats, calibrate, load_examples

    spec = recipe.method
    if not spec.calibration:
        return None
    settings = CalibrationSettings(
        samples=int(recipe.parameters.get("calibration_samples", spec.param("calibration_samples").default)),
        max_length=int(recipe.parameters.get("calibration_max_length", spec.param("calibration_max_length").default)),
    )
    opened: list[CalibrationStats] = []
    try:
        for entry, model in zip(recipe.input_entries(), models.inputs):
            examples = load_examples(entry.calibration, settings.samples, policy, f"calibration of {model.ref}")
            report = (lambda done, total, ref=model.ref: progress(ref, done, total)) if progress else None
            path = calibrate(spec.calibration, model.folder, examples, settings, device=device, progress=report, cancel=cancel)
            opened.append(CalibrationStats(path))
    except BaseException:
        for entry in opened:
            entry.close()
        raise
    return opened


def _stream(recipe, method, models: _Inputs, plans, writer, compute, progress, cancel, stats=None) -> None:
    """Compute and write every planned tensor, reading the next one's inputs in the background."""
    # linear and slerp take the base as an ordinary input: it is read once, among the inputs
    spec = recipe.method
    reads_base = models.base and spec.uses_base and not spec.base_is_input
    base_reader = models.reader(models.base) if reads_base else None
    readers = [(m.ref, models.reader(m)) for m in models.inputs]
    ref_reader = models.reader(models.reference)

    # The reader thread only reads (no torch compute: a second thread of parallel torch ops
    # would fight the main one for the cores).
    def load(plan: TensorPlan):
        name = plan.out.name
        if not plan.merged:
            return ref_reader.get(name), None, None
        base = base_reader.get(name).to(compute, non_blocking=True) if base_reader else None
        tensors = [reader.get(name).to(compute, non_blocking=True) for _, reader in readers]
        extra = [_tensor_stats(entry, name, compute) for entry in stats] if stats else None
        return None, base, (tensors, extra)

    # A reader thread fetches the next tensor's inputs while the current one is computed: at
    # most two tensors per input are in memory. (A writer thread measured no faster: writing
    # from the page cache is cheap next to the compute.)
    with ThreadPoolExecutor(1, "merge-reader") as reads:
        pending = reads.submit(load, plans[0]) if plans else None
        for index, plan in enumerate(plans):
            if cancel is not None and cancel.is_set():
                pending.cancel()
                raise MergeCancelled("merge cancelled; nothing was written")
            copied, base, loaded = pending.result()
            pending = reads.submit(load, plans[index + 1]) if index + 1 < len(plans) else None
            if plan.merged:
                tensors, extra = loaded
                per_model, params = resolve_parameters(recipe, plan)
                result = method(base, tensors, per_model, params, tensor_seed(recipe.seed, plan.out.name), extra)
                out = result.to(plan.out.dtype)
                if not _all_finite(out):  # NaN/Inf in any source always reaches the result
                    raise CheckpointError(_non_finite_message(plan.out, result, base, tensors, models))
                del base, tensors, extra, result
            else:
                out = copied.to(plan.out.dtype)
            writer.write(plan.out.name, out)
            if progress is not None:
                progress(index + 1, len(plans), plan.out.name)


def _tensor_stats(entry, name: str, compute: torch.device):
    """One model's statistics for one tensor, on the compute device (see merging.calibration)."""
    if entry.kind == "fisher":
        fisher = entry.fisher(name)
        return (None if fisher is None else fisher.to(compute), entry.norm)
    gram = entry.gram(name)
    return None if gram is None else (gram[0].to(compute), gram[1])


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf anywhere: a float32 sum is non-finite if any entry is (checked fully only then)."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def _non_finite_message(out: TensorInfo, result, base, tensors, models: _Inputs) -> str:
    """Say why a merged tensor is not finite: a damaged source (named), or overflow."""
    sources = ([(models.base.ref, base)] if base is not None else []) + [
        (m.ref, t) for m, t in zip(models.inputs, tensors)
    ]
    for ref, tensor in sources:
        if not _all_finite(tensor):
            return (
                f"tensor {out.name} of {ref} contains NaN or Inf values; the checkpoint is damaged "
                "(or overflowed in a lower precision): fix or re-export that model"
            )
    if _all_finite(result):
        dtype = str(out.dtype).removeprefix("torch.")
        return (
            f"merged tensor {out.name} does not fit in {dtype} (values up to {result.abs().max().item():.3g}); "
            "lower lambda or the weights, or choose a wider dtype such as bfloat16 or float32"
        )
    return (
        f"merging tensor {out.name} overflowed to NaN or Inf although every source is finite; "
        "lower lambda or the weights in the recipe"
    )
