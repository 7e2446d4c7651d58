"""What a merge will do, decided before any weight is read: the models, their compatibility,
and a plan per output tensor (copied or merged, its dtype, its place among the layers, its
parameter values).

The compatibility checks (``config_mismatch``, ``layout_mismatch``) are also the Models tab's
verdict, so a user sees the engine's own message before merging.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from merging import hub
from merging.adapters import open_reader
from merging.checkpoint import CheckpointReader, TensorInfo, safetensors_files
from merging.errors import CheckpointError, RecipeError
from merging.recipe import ModelEntry, OutputSlice, Recipe, entries_for, resolve, slice_base
from merging.sources import HUB_ID, ResolvedModel, SourcePolicy, resolve_model, split_revision
from merging.vocabulary import is_vocabulary_tensor

LAYER_INDEX = re.compile(r"\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Source:
    """One tensor of one input model."""

    model: str  # the model's reference, as the recipe names it
    name: str  # the tensor's name in that model's checkpoint


@dataclass
class TensorPlan:
    """One output tensor: how it is made, from which tensors, and with which parameter scopes.

    ``inputs`` are the method's inputs in order (a copied tensor: its one source); ``base`` the
    origin of task vectors, for methods whose spec says ``base: origin``. ``t`` is the tensor's
    place among the layers for gradients (mergekit's: layer i of N at i/(N-1); a slice's own
    layers; other tensors at 0). A parameter is looked up in ``model_scopes[i]`` (per model,
    highest precedence first) or ``global_scopes``, then takes its default.
    """

    out: TensorInfo
    merged: bool  # False: copied (not floating point, or present only in the reference)
    t: float = 0.0
    inputs: tuple[Source, ...] = ()
    base: Source | None = None
    model_scopes: tuple[tuple[dict, ...], ...] = ()
    global_scopes: tuple[dict, ...] = ()
    vocabulary: bool = False  # indexed by token: the inputs are aligned to the output tokenizer first


@dataclass
class ModelSet:
    """The resolved models of a recipe and their open readers."""

    reference: ResolvedModel  # config source: the base, else the first model named
    base: ResolvedModel | None
    inputs: list[ResolvedModel]  # the method's inputs (models: recipes), or every model a slice names
    tokenizer: ResolvedModel
    models: dict[str, ResolvedModel] = field(default_factory=dict)  # every model the recipe names, by reference
    readers: dict[str, CheckpointReader] = field(default_factory=dict)

    def reader(self, model: ResolvedModel | str) -> CheckpointReader:
        return self.readers[model if isinstance(model, str) else model.ref]

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def tensor_seed(seed: int, name: str) -> int:
    """A seed for a tensor's random steps, from the recipe seed and the tensor name only.

    Independent of order and device, so a merge is reproducible however it is run.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 8  # leaves room for + model index


def check_supported(recipe: Recipe) -> None:
    """Refuse, before anything is read, the parts of mergekit's schema the engine cannot run yet."""
    missing = []
    if recipe.slices is not None and recipe.method.calibration:
        missing.append(f"layer slices with {recipe.merge_method}, which calibrates whole models (use 'models:')")
    if missing:
        raise CheckpointError(f"this recipe uses {', '.join(missing)}, which Merge Studio does not run yet")


def open_inputs(recipe: Recipe, policy: SourcePolicy, resolver=resolve_model) -> ModelSet:
    """Resolve every model of the recipe, checking configs before any weights are fetched.

    A first round reads only config files (for Hub models, a few KB), so incompatible
    architectures or vocabularies are reported before a long download; the second resolves
    the weights.
    """
    models = _resolve_all(recipe, lambda ref: resolver(ref, policy, weights=False))
    check_configs(models, vocabularies_may_differ=recipe.tokenizer is not None)
    if recipe.slices is None:  # slices may take layers from models of other depths
        check_layouts_before_download(models, policy, vocabularies_may_differ=recipe.tokenizer is not None)
    adapted = next((m.ref for m in models.models.values() if getattr(m, "adapter", None)), None)
    if adapted and recipe.method.calibration:
        raise CheckpointError(f"{recipe.merge_method} calibrates whole models, which does not apply LoRA adapters yet "
                              f"({adapted}): merge the adapter into its base first and name that folder")
    models = _resolve_all(recipe, lambda ref: resolver(ref, policy))
    try:
        for model in models.models.values():
            models.readers[model.ref] = open_reader(model, allow_pickle=policy.allow_pickle, label=model.ref)
    except BaseException:
        models.close()
        raise
    return models


def _resolve_all(recipe: Recipe, resolve_one) -> ModelSet:
    cache: dict[str, ResolvedModel] = {}

    def get(ref: str) -> ResolvedModel:
        if ref not in cache:
            cache[ref] = resolve_one(ref)
        return cache[ref]

    base = get(recipe.base_model) if recipe.base_model else None
    if recipe.slices is None:
        inputs = [get(entry.model) for entry in recipe.input_entries()]
    else:
        inputs = [get(ref) for ref in recipe.referenced_models() if ref != recipe.base_model]
    merged = {ref: get(ref) for ref in recipe.referenced_models()}  # not the tokenizer source: it only gives files
    reference = base or inputs[0]
    named = recipe.tokenizer_source not in (None, "base", "union")  # a model's tokenizer (else the reference's files)
    tokenizer = get(recipe.tokenizer_source) if named else reference
    return ModelSet(reference, base, inputs, tokenizer, models=merged)


def check_configs(models: ModelSet, *, vocabularies_may_differ: bool = False) -> None:
    """Architecture and vocabulary checks from config.json alone, before any weight is read
    (with a tokenizer setting, vocabularies may differ: they are aligned to the output's)."""
    for other in models.models.values():
        problem = config_mismatch(models.reference, other, vocabularies_may_differ)
        if problem:
            raise CheckpointError(problem)


def check_layouts_before_download(models: ModelSet, policy: SourcePolicy, *,
                                  vocabularies_may_differ: bool = False) -> None:
    """For Hub models not yet downloaded, tensor names and shapes from their safetensors headers
    (range reads of a few KB per file) against the reference's, before any weight is fetched:
    two models with the same config whose checkpoints differ in one tensor are refused here,
    not after a download of gigabytes (local folders are checked as they are read, in
    ``plan_tensors``). Models with a LoRA adapter keep their base's layout and are skipped."""
    remote = [m for m in models.models.values()
              if getattr(m, "adapter", None) is None and not safetensors_files(m.folder)
              and HUB_ID.match(split_revision(m.ref)[0])]
    if not remote:
        return
    reference = models.reference
    if reference in remote:
        layout = {name: shape for name, (shape, _) in hub.tensors(reference.ref, policy.hub_token).items()}
    elif getattr(reference, "adapter", None) is None and safetensors_files(reference.folder):
        reader = CheckpointReader(reference.folder, label=reference.ref)
        try:
            layout = {name: tuple(reader.info(name).shape) for name in reader.names()}
        finally:
            reader.close()
    else:
        return
    for model in remote:
        if model is reference:
            continue
        theirs = {name: shape for name, (shape, _) in hub.tensors(model.ref, policy.hub_token).items()}
        problem = layout_mismatch(reference.ref, layout, model.ref, theirs, vocabularies_may_differ)
        if problem:
            raise CheckpointError(problem)


def config_mismatch(ref, other, vocabularies_may_differ: bool = False) -> str | None:
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
    if ours is not None and theirs is not None and ours != theirs and not vocabularies_may_differ:
        return vocabulary_message(ref.ref, ours, other.ref, theirs)
    return None


def layout_mismatch(ref_label: str, ref_shapes: dict, other_label: str, other_shapes: dict,
                    vocabularies_may_differ: bool = False) -> str | None:
    """Why two checkpoints' tensors (name -> shape) cannot be merged: a tensor only ``other``
    has, or a shape that differs (with a tokenizer setting, vocabulary tensors may differ in
    their token axis); None when they fit. (Tensors only the reference has are judged by the
    caller: the engine copies them when no input has them.)"""
    stray = next((name for name in other_shapes if name not in ref_shapes), None)
    if stray is not None:
        return f"tensor {stray} is in {other_label} but not in {ref_label}; the checkpoints do not have the same layout"
    for name, shape in ref_shapes.items():
        theirs = other_shapes.get(name)
        if theirs is None or tuple(theirs) == tuple(shape):
            continue
        if is_vocabulary_tensor(name, tuple(shape), None) and tuple(theirs[1:]) == tuple(shape[1:]):
            if vocabularies_may_differ:
                continue
            return vocabulary_message(ref_label, shape[0], other_label, theirs[0])
        return (
            f"tensor {name} has shape {list(shape)} in {ref_label} but {list(theirs)} in {other_label}; "
            "these models cannot be merged"
        )
    return None


def vocabulary_message(ref_a: str, size_a, ref_b: str, size_b) -> str:
    return (
        f"vocabulary sizes differ: {ref_a} has {size_a} tokens, {ref_b} has {size_b}. To merge models whose "
        "vocabularies differ, say which tokenizer the output takes: 'tokenizer_source: union' (every "
        "model's tokens), 'base', or a model; each model's embedding rows are then aligned to it, as mergekit does"
    )


def plan_tensors(recipe: Recipe, models: ModelSet, vocabulary_size: int | None = None) -> list[TensorPlan]:
    """Check every input tensor and decide how each output tensor is made. With a tokenizer
    setting (``vocabulary_size``: the output's rows), vocabulary tensors take that many rows."""
    plans = plan_slices(recipe, models) if recipe.slices is not None else _plan_models(recipe, models)
    if vocabulary_size is not None:
        ref_size = models.reference.config.get("vocab_size")
        for plan in plans:
            if plan.merged and is_vocabulary_tensor(plan.out.name, plan.out.shape, ref_size):
                plan.out = TensorInfo(plan.out.name, (vocabulary_size, *plan.out.shape[1:]), plan.out.dtype)
                plan.vocabulary = True
    return plans


def _plan_models(recipe: Recipe, models: ModelSet) -> list[TensorPlan]:
    ref_reader = models.reader(models.reference)
    out_dtype = recipe.output_dtype
    num_layers = _layer_count(models.reference.config, ref_reader.names())
    entries = recipe.input_entries()
    input_readers = [(m, models.reader(m)) for m in models.inputs]
    names = ref_reader.names()
    ref_shapes = {name: ref_reader.info(name).shape for name in names}
    for model, reader in input_readers:
        problem = layout_mismatch(models.reference.ref, ref_shapes, model.ref, {n: reader.info(n).shape for n in reader.names()},
                                  recipe.tokenizer is not None)
        if problem:
            raise CheckpointError(problem)
    origin = models.base if models.base and recipe.method.base == "origin" else None
    model_scopes = tuple((entry.parameters, recipe.parameters) for entry in entries)
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
        inputs = tuple(Source(m.ref, name) for m in models.inputs) if merged else (Source(models.reference.ref, name),)
        plans.append(TensorPlan(TensorInfo(name, info.shape, dtype), merged, _layer_position(name, num_layers), inputs,
                                Source(origin.ref, name) if merged and origin else None,
                                model_scopes, (recipe.parameters,)))
    return plans


def plan_slices(recipe: Recipe, models: ModelSet) -> list[TensorPlan]:
    """The output of a ``slices:`` recipe, layer by layer, as mergekit plans it.

    Output layer j of slice k merges layer start + i of every source of the slice (i = j's place
    in the slice), with gradients over the slice's own layers (t = i/(n−1)). Tensors outside the
    layers are merged over the sources of the first slice (embeddings) or of the last slice
    (final norm, lm_head), at t = 0. The output has as many layers as the slices together.
    """
    spec = recipe.method
    ref_reader = models.reader(models.reference)
    templates, outside = _layer_templates(ref_reader.names())
    out_dtype = recipe.output_dtype
    plans: list[TensorPlan] = []
    layer = 0
    for k, piece in enumerate(recipe.slices):
        base, entries = slice_inputs(recipe, piece, k)
        starts = {s.model: s.layer_range[0] for s in piece.sources}
        for s in piece.sources:
            depth = _layer_count(models.models[s.model].config, models.reader(s.model).names())
            if s.layer_range[1] > depth:
                raise CheckpointError(f"slices[{k}]: {s.model} has {depth} layers, so layer_range {list(s.layer_range)} "
                                      f"does not fit (layers are counted from 0; the end is excluded)")
        scopes = tuple((entry.parameters, piece.parameters, recipe.parameters) for entry in entries)
        for i in range(piece.num_layers):
            t = i / (piece.num_layers - 1) if piece.num_layers > 1 else 1.0
            for template in templates:
                out_name = template.format(layer)
                sources = [Source(e.model, template.format(starts[e.model] + i)) for e in entries]
                origin = Source(base, template.format(starts[base] + i)) if spec.base == "origin" and base else None
                plans.append(_slice_tensor(models, out_name, sources, origin, t, scopes, (piece.parameters, recipe.parameters),
                                           out_dtype, recipe.tokenizer is not None))
            layer += 1
    first, last = recipe.slices[0], recipe.slices[-1]
    for name in outside:
        piece = first if _before_layers(name) else last
        base, entries = slice_inputs(recipe, piece, recipe.slices.index(piece))
        scopes = tuple((entry.parameters, piece.parameters, recipe.parameters) for entry in entries)
        origin = Source(base, name) if spec.base == "origin" and base else None
        plans.append(_slice_tensor(models, name, [Source(e.model, name) for e in entries], origin, 0.0, scopes,
                                   (piece.parameters, recipe.parameters), out_dtype, recipe.tokenizer is not None))
    return sorted(plans, key=lambda plan: _output_order(plan.out.name))


def slice_inputs(recipe: Recipe, piece: OutputSlice, index: int) -> tuple[str | None, list[ModelEntry]]:
    """(the slice's base, the method's inputs among its sources). As in mergekit, a slice's base
    (its own ``base_model``, else the recipe's) is one of its sources, never added to them."""
    spec = recipe.method
    refs = [s.model for s in piece.sources]
    base = slice_base(piece, recipe.base_model)
    if spec.needs_base and base is None:
        raise RecipeError(f"slices[{index}]: {spec.name} needs its base model among the slice's sources "
                          f"({', '.join(refs)}): its layers are the origin of the task vectors")
    return base, entries_for(spec, [ModelEntry(s.model, s.parameters) for s in piece.sources], base)


def _slice_tensor(models: ModelSet, out_name: str, sources: list[Source], origin: Source | None, t: float,
                  model_scopes: tuple, global_scopes: tuple, out_dtype, vocabularies_may_differ: bool) -> TensorPlan:
    """One output tensor of a slice recipe, its inputs checked to exist and agree in shape (a
    vocabulary tensor's token axis may differ when the recipe sets the tokenizer)."""
    first = None
    for source in [*sources, *([origin] if origin else [])]:
        reader = models.reader(source.model)
        if source.name not in reader:
            raise CheckpointError(f"tensor {source.name} is not in {source.model}; the models of a slice must "
                                  "share the architecture's tensors")
        info = reader.info(source.name)
        same = tuple(info.shape[1:]) == tuple(first.shape[1:]) if first is not None and vocabularies_may_differ \
            and is_vocabulary_tensor(source.name, tuple(info.shape), None) else first is None or tuple(info.shape) == tuple(first.shape)
        if not same:
            raise CheckpointError(f"tensor {source.name} has shape {list(info.shape)} in {source.model} but "
                                  f"{list(first.shape)} in {sources[0].model}; these layers cannot be merged")
        first = first or info
    floating = first.dtype.is_floating_point
    dtype = (out_dtype or first.dtype) if floating else first.dtype
    if not floating:
        return TensorPlan(TensorInfo(out_name, first.shape, dtype), False, t, (sources[0],))
    return TensorPlan(TensorInfo(out_name, first.shape, dtype), True, t, tuple(sources), origin, model_scopes, global_scopes)


def _layer_templates(names: list[str]) -> tuple[list[str], list[str]]:
    """(the tensor names of one layer, with the layer index as ``{}``; the names outside the layers),
    from the reference checkpoint's layer 0."""
    templates, outside = [], []
    for name in names:
        match = LAYER_INDEX.search(name)
        if match is None:
            outside.append(name)
        elif match.group(1) == "0":
            templates.append(name[: match.start(1)] + "{}" + name[match.end(1):])
    return templates, outside


def _before_layers(name: str) -> bool:
    """Whether a tensor outside the layers comes before them (embeddings) rather than after them."""
    return any(part in name for part in ("embed", "wte", "wpe", "word_embeddings"))


def _output_order(name: str) -> tuple:
    """Checkpoint order: embeddings, then the layers in order, then the rest."""
    match = LAYER_INDEX.search(name)
    if match:
        return (1, int(match.group(1)), name)
    return (0 if _before_layers(name) else 2, 0, name)


def config_updates(recipe: Recipe, models: ModelSet) -> dict:
    """What the output's config.json changes from the reference's: for a slice recipe, the number
    of layers, and every per-layer list (such as ``layer_types``) rebuilt from the layers the output
    took (each from the first source of its slice)."""
    if recipe.slices is None:
        return {}
    taken = [(piece.sources[0].model, piece.sources[0].layer_range[0] + i)
             for piece in recipe.slices for i in range(piece.num_layers)]
    config = models.reference.config
    depth = _layer_count(config, [])
    updates = {key: len(taken) for key in LAYER_COUNT_KEYS if isinstance(config.get(key), int)}
    for key, value in config.items():
        if isinstance(value, list) and len(value) == depth and key not in updates:
            updates[key] = [_per_layer(models.models[model].config, key, value)[index] for model, index in taken]
    return updates


def _per_layer(config: dict, key: str, fallback: list) -> list:
    value = config.get(key)
    return value if isinstance(value, list) else fallback


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
    """Per-model and global parameter values for one tensor: the first of the plan's scopes that sets
    a parameter (and whose filters match this tensor) wins, else the parameter's default."""
    spec = recipe.method
    name = plan.out.name

    def value(param, scopes):
        for scope in scopes:
            if param.name in scope:
                result = resolve(scope[param.name], param, name, plan.t)
                if result is not None:
                    return result
        return param.default

    global_values = {p.name: value(p, plan.global_scopes) for p in spec.global_params()}
    per_model = [{p.name: value(p, scopes) for p in spec.model_params()} for scopes in plan.model_scopes]
    return per_model, global_values
