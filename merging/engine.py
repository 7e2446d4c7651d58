"""The merge engine: resolve, check, plan, then stream every tensor through its method.

Peak memory is about two tensors per input model in their stored dtype (the one being merged
and the next, read on a background thread while the current one is computed) plus one float32
result and a few MB of chunk scratch: methods widen inputs chunk by chunk, and the writer
streams each result straight into its shard. Tensors are read with preadv, not memory-mapped,
so pages of tensors already merged do not stay in the process's memory.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from merging.calibration import CalibrationSettings, CalibrationStats, calibrate, calibrate_jointly, load_examples
from merging.checkpoint import (
    StreamingWriter,
    all_finite,
    atomic_output,
    check_output_dir,
    copy_support_files,
    damaged_source,
)
from merging.errors import CheckpointError, MergeCancelled, check_cancel
from merging.methods import get_method
from merging.methods.spec import step_reporting
from merging.model_card import write_model_card
from merging.plan import (ModelSet, Source, TensorPlan, check_supported, config_updates, open_inputs, plan_tensors,
                          resolve_parameters, tensor_seed)
from merging.recipe import Recipe
from merging.runtime import pick_device
from merging.sources import SourcePolicy, resolve_model
from merging.units import parse_size
from merging.vocabulary import Vocabulary, build_vocabulary, output_tokenizer

ProgressFn = Callable[[float, int, str], None]  # (tensors done, with a fraction while a long one runs; total; name)
CalibrationProgressFn = Callable[[str, int, int], None]  # (model reference, examples done, total)
CANCELLED = "merge cancelled; nothing was written"


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
    max_shard = parse_size(shard_size, "shard size")
    check_supported(recipe)
    check_output_dir(Path(out_dir), overwrite=overwrite)  # before any download
    with _prepared(recipe, policy, resolver, device, calibration_progress, cancel) as (method, models, vocabulary,
                                                                                     plans, stats):
        protected = [m.folder for m in [models.tokenizer, *models.models.values()]]
        protected += [m.adapter for m in models.models.values() if m.adapter is not None]  # adapters are sources too
        with atomic_output(Path(out_dir), overwrite=overwrite, protected=protected) as temp:
            writer = StreamingWriter(temp, [p.out for p in plans], max_shard)
            try:
                _stream(recipe, method, models, plans, writer, compute, progress, cancel, stats, vocabulary)
                shards = writer.finish()
                tokenizer = output_tokenizer(recipe, vocabulary, models.tokenizer.folder,
                                             [m.folder for m in models.models.values()])
                updates = {**config_updates(recipe, models), **({"vocab_size": vocabulary.size} if vocabulary else {})}
                copy_support_files(models.reference.folder, None if tokenizer else models.tokenizer.folder, temp,
                                   recipe.output_dtype, updates)
                if tokenizer is not None:
                    tokenizer.save_pretrained(temp)
                write_model_card(temp, recipe, {ref: m.folder for ref, m in models.models.items()})
            except OSError as exc:
                raise CheckpointError(
                    f"writing the merged model failed: {exc.strerror or exc}"
                    + (" (disk full: free some space or choose another output folder)" if exc.errno == 28 else "")
                ) from None
            finally:
                writer.abort()
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


def merged_tensors(
    recipe: Recipe,
    *,
    device: str = "auto",
    policy: SourcePolicy = SourcePolicy(),
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    resolver=resolve_model,
    calibration_progress: CalibrationProgressFn | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``merge`` would write for ``recipe``, one at a time as (name, tensor), on the
    compute device and in the output dtype; nothing is written (parameter search loads them into
    a model it keeps in memory). The same checks, calibration and method code as ``merge``; the
    sources close when the iteration ends or is abandoned."""
    compute = pick_device(device)
    check_supported(recipe)
    with _prepared(recipe, policy, resolver, device, calibration_progress, cancel) as (method, models, vocabulary,
                                                                                     plans, stats):
        for index, (plan, out) in enumerate(_merged_tensors(recipe, method, models, plans, compute, progress, cancel,
                                                            stats, vocabulary)):
            yield plan.out.name, out
            if progress is not None:
                progress(index + 1, len(plans), plan.out.name)


@contextmanager
def _prepared(recipe: Recipe, policy: SourcePolicy, resolver, device: str, calibration_progress, cancel):
    """What every merge needs before its first tensor: the method, the open models (configs
    checked before any weight is fetched), the output vocabulary, the tensor plans and the
    calibration statistics; the models and statistics close when the block ends."""
    method = get_method(recipe.merge_method)
    models = open_inputs(recipe, policy, resolver)
    stats = None
    try:
        vocabulary = build_vocabulary(recipe, {ref: m.folder for ref, m in models.models.items()}, models.reference.ref,
                                      {ref: m.config.get("vocab_size") for ref, m in models.models.items()},
                                      models.tokenizer.folder)
        plans = plan_tensors(recipe, models, vocabulary.size if vocabulary else None)
        stats = calibrate_inputs(recipe, method, models, plans, policy, device, calibration_progress, cancel)
        yield method, models, vocabulary, plans, stats
    finally:
        models.close()
        for entry in stats or []:
            entry.close()


def written_dtype(plans: list[TensorPlan]) -> str:
    """The floating dtype(s) the output holds, largest share first: ``bfloat16``, or
    ``bfloat16/float32`` when a model keeps some tensors wider (what "as base" resolves to)."""
    sizes: dict[str, int] = {}
    for plan in plans:
        if plan.out.dtype.is_floating_point:
            name = str(plan.out.dtype).removeprefix("torch.")
            sizes[name] = sizes.get(name, 0) + plan.out.nbytes
    return "/".join(sorted(sizes, key=sizes.get, reverse=True)) or "none"


def calibrate_inputs(recipe: Recipe, method, models: ModelSet, plans: list[TensorPlan], policy: SourcePolicy,
                     device: str, progress: CalibrationProgressFn | None, cancel) -> list[CalibrationStats] | None:
    """Per input model, its cached calibration statistics (computed now if missing), or None
    for methods that need no data. A joint kind (RegMean++) calibrates all models at once,
    merging layer by layer with this recipe's own ``method`` and parameters."""
    spec = recipe.method
    if not spec.calibration:
        return None
    settings = CalibrationSettings.from_parameters(
        {p.name: recipe.parameters.get(p.name, p.default) for p in spec.global_params()})
    examples = [load_examples(entry.calibration, settings.samples, policy, f"calibration of {model.ref}")
                for entry, model in zip(recipe.input_entries(), models.inputs)]
    if spec.calibration.joint:
        paths = _calibrate_jointly(recipe, method, models, plans, examples, settings, device, progress, cancel)
        return [CalibrationStats(path) for path in paths]
    opened: list[CalibrationStats] = []
    try:
        for texts, model in zip(examples, models.inputs):
            report = (lambda done, total, ref=model.ref: progress(ref, done, total)) if progress else None
            path = calibrate(spec.calibration, model.folder, texts, settings, device=device, progress=report, cancel=cancel)
            opened.append(CalibrationStats(path))
    except BaseException:
        for entry in opened:
            entry.close()
        raise
    return opened


def _calibrate_jointly(recipe: Recipe, method, models: ModelSet, plans: list[TensorPlan], examples, settings,
                       device: str, progress: CalibrationProgressFn | None, cancel) -> list:
    """``calibrate_jointly`` with this merge's reading and merging of one tensor, the tensor
    named as the first input model stores it; the merged tensor is cast to the output dtype,
    so the layers the statistics flow through are exactly the ones written."""
    if any(plan.vocabulary for plan in plans):
        raise CheckpointError(f"{recipe.merge_method} runs each model's calibration text through the merged layers, "
                              "which needs one vocabulary: drop the tokenizer setting, or use regmean")
    compute = pick_device(device)
    by_name = {plan.inputs[0].name: plan for plan in plans if plan.merged}

    def read(index: int, name: str):
        source = by_name[name].inputs[index]
        return models.reader(source.model).get(source.name)

    def merge_one(name: str, stats):
        plan = by_name[name]
        tensors = [models.reader(source.model).get(source.name).to(compute) for source in plan.inputs]
        base = models.reader(plan.base.model).get(plan.base.name).to(compute) if plan.base else None
        extra = [None if entry is None else (entry[0].to(compute), entry[1]) for entry in stats]
        per_model, params = resolve_parameters(recipe, plan)
        result = method(base, tensors, per_model, params, tensor_seed(recipe.seed, plan.out.name), extra)
        return result.to(plan.out.dtype)

    return calibrate_jointly(recipe.method.calibration, [m.folder for m in models.inputs], examples, settings,
                             recipe.to_yaml(), read, merge_one, device=device, progress=progress, cancel=cancel)


def _stream(recipe, method, models: ModelSet, plans, writer, compute, progress, cancel, stats=None,
            vocabulary: Vocabulary | None = None) -> None:
    """Compute and write every planned tensor, reading the next one's inputs in the background."""
    for index, (plan, out) in enumerate(_merged_tensors(recipe, method, models, plans, compute, progress, cancel,
                                                        stats, vocabulary)):
        writer.write(plan.out.name, out)
        if progress is not None:
            progress(index + 1, len(plans), plan.out.name)


def _merged_tensors(recipe, method, models: ModelSet, plans, compute, progress, cancel, stats=None,
                    vocabulary: Vocabulary | None = None) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Every planned tensor, merged (or copied) and cast to its output dtype, in plan order."""
    kind = recipe.method.calibration

    # The reader thread only reads (no torch compute: a second thread of parallel torch ops
    # would fight the main one for the cores).
    def read(source: Source):
        return models.reader(source.model).get(source.name).to(compute, non_blocking=True)

    def load(plan: TensorPlan):
        if not plan.merged:
            return models.reader(plan.inputs[0].model).get(plan.inputs[0].name), None, None
        base = read(plan.base) if plan.base else None
        tensors = [read(source) for source in plan.inputs]
        if plan.vocabulary:  # each model's rows re-indexed to the output tokenizer (mergekit's alignment)
            aligned = vocabulary.align({s.model: t for s, t in zip([*plan.inputs, *([plan.base] if base is not None else [])],
                                                                [*tensors, *([base] if base is not None else [])])})
            tensors = [aligned[source.model] for source in plan.inputs]
            base = aligned[plan.base.model] if base is not None else None
        extra = [kind.tensor_stats(entry, source.name, compute) for entry, source in zip(stats, plan.inputs)] if stats else None
        return None, base, (tensors, extra)

    # A reader thread fetches the next tensor's inputs while the current one is computed: at
    # most two tensors per input are in memory. (A writer thread measured no faster: writing
    # from the page cache is cheap next to the compute.)
    with ThreadPoolExecutor(1, "merge-reader") as reads:
        pending = reads.submit(load, plans[0]) if plans else None
        for index, plan in enumerate(plans):
            try:
                check_cancel(cancel, CANCELLED, MergeCancelled)
            except MergeCancelled:
                pending.cancel()  # the read in flight is not waited for
                raise
            copied, base, loaded = pending.result()
            pending = reads.submit(load, plans[index + 1]) if index + 1 < len(plans) else None
            if plan.merged:
                tensors, extra = loaded
                per_model, params = resolve_parameters(recipe, plan)
                with step_reporting(_step_hook(index, len(plans), plan.out.name, progress, cancel)):
                    result = method(base, tensors, per_model, params, tensor_seed(recipe.seed, plan.out.name), extra)
                out = result.to(plan.out.dtype)
                if not all_finite(out):  # NaN/Inf in any source always reaches the result
                    raise CheckpointError(_non_finite_message(plan, result, base, tensors))
                del base, tensors, extra, result
            else:
                out = copied.to(plan.out.dtype)
            yield plan, out


def _step_hook(index: int, count: int, name: str, progress: ProgressFn | None, cancel):
    """What a method's ``report_steps`` does for tensor ``index``: honour Stop, and report the
    fraction done as progress ``index + fraction`` of ``count`` (every 5%, not every step)."""
    shown = [0]

    def hook(done: int, total: int) -> None:
        check_cancel(cancel, CANCELLED, MergeCancelled)
        twentieths = 20 * done // max(1, total)
        if progress is not None and twentieths > shown[0]:
            shown[0] = twentieths
            progress(index + twentieths / 20, count, name)

    return hook


def _non_finite_message(plan: TensorPlan, result, base, tensors) -> str:
    """Say why a merged tensor is not finite: a damaged source (named), or overflow."""
    out = plan.out
    sources = ([(plan.base.model, base)] if base is not None else []) + [
        (source.model, t) for source, t in zip(plan.inputs, tensors)
    ]
    damaged = damaged_source(out.name, sources)
    if damaged:
        return damaged
    if all_finite(result):
        dtype = str(out.dtype).removeprefix("torch.")
        return (
            f"merged tensor {out.name} does not fit in {dtype} (values up to {result.abs().max().item():.3g}); "
            "lower lambda or the weights, or choose a wider dtype such as bfloat16 or float32"
        )
    return (
        f"merging tensor {out.name} overflowed to NaN or Inf although every source is finite; "
        "lower lambda or the weights in the recipe"
    )
