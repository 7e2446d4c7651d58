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

from merging.checkpoint import CheckpointReader, TensorInfo
from merging.errors import CheckpointError
from merging.recipe import Recipe, resolve
from merging.sources import ResolvedModel, SourcePolicy, resolve_model

LAYER_INDEX = re.compile(r"\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class TensorPlan:
    """One output tensor: how it is made, and where it sits among the layers (``t``)."""

    out: TensorInfo
    merged: bool  # False: copied from the reference model (non-float, or present only there)
    t: float = 0.0


@dataclass
class ModelSet:
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


def tensor_seed(seed: int, name: str) -> int:
    """A seed for a tensor's random steps, from the recipe seed and the tensor name only.

    Independent of order and device, so a merge is reproducible however it is run.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 8  # leaves room for + model index


def check_supported(recipe: Recipe) -> None:
    """Refuse, before anything is read, the parts of mergekit's schema the engine cannot run yet."""
    missing = []
    if recipe.slices is not None:
        missing.append("layer slices ('slices:' / 'modules:')")
    if recipe.tokenizer and (recipe.tokenizer.source == "union" or recipe.tokenizer.tokens
                             or recipe.tokenizer.pad_to_multiple_of is not None):
        missing.append("merging vocabularies (tokenizer source 'union', 'tokens', 'pad_to_multiple_of')")
    if recipe.chat_template:
        missing.append("setting a chat template ('chat_template:')")
    lora = next((ref for ref in recipe.referenced_models() if "+" in ref), None)
    if lora:
        missing.append(f"LoRA references (model+adapter: {lora})")
    if missing:
        raise CheckpointError(f"this recipe uses {', '.join(missing)}, which Merge Studio does not run yet")


def open_inputs(recipe: Recipe, policy: SourcePolicy, resolver=resolve_model) -> ModelSet:
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


def _resolve_all(recipe: Recipe, resolve_one) -> ModelSet:
    cache: dict[str, ResolvedModel] = {}

    def get(ref: str) -> ResolvedModel:
        if ref not in cache:
            cache[ref] = resolve_one(ref)
        return cache[ref]

    base = get(recipe.base_model) if recipe.base_model else None
    inputs = [get(entry.model) for entry in recipe.input_entries()]
    reference = base or inputs[0]
    tokenizer = reference if recipe.tokenizer_source in (None, "base") else get(recipe.tokenizer_source)
    return ModelSet(reference, base, inputs, tokenizer)


def check_configs(models: ModelSet) -> None:
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


def plan_tensors(recipe: Recipe, models: ModelSet) -> list[TensorPlan]:
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
