"""PEFT LoRA adapters applied while reading: a ``model+adapter`` reference, one tensor at a time.

mergekit 0.1.5 applies ``model+lora`` by loading the whole base with transformers, attaching the
adapter with ``peft.PeftModel.from_pretrained``, calling ``merge_and_unload`` and saving the result
in its ``--lora-merge-cache``. Here nothing is loaded whole: ``open_reader`` indexes the adapter's
safetensors header next to the base's, checks every tensor the adapter touches against the base's
shapes, and its reader hands out the base's tensors one at a time, with the adapter applied to
those it touches exactly as peft's merge computes it (``apply_update``):

- a LoRA module (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``): W + ΔW with
  ΔW = transpose(B·A, fan_in_fan_out) · scaling, scaling = lora_alpha / r (rsLoRA:
  lora_alpha / √r), r and lora_alpha per module from ``rank_pattern`` / ``alpha_pattern``
  (Hu et al. 2021, https://arxiv.org/abs/2106.09685; Kalajdzievski 2023, https://arxiv.org/abs/2312.03732);
- DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) on linear layers: m / ‖W + ΔW‖ · (W + ΔW),
  the norm taken per output feature;
- ``lora_bias``: b + B.bias · scaling;
- tensors the adapter saves whole (``modules_to_save``, biases trained with ``bias: all`` or
  ``lora_only``, embedding layers saved with ``save_embedding_layers``) replace the base's first,
  as loading the adapter into the base does, and the LoRA delta is added to them.

What cannot be applied exactly is refused in one line (``check_config``, ``open_reader``):
adapter types other than LoRA, LoRA variants other than DoRA, DoRA on embeddings, initialisations
that rewrite the base weights (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA: save such adapters converted),
layer replication, LoRA on raw parameters, trainable tokens, tied adapters, and any adapter tensor
that names no tensor of the base or does not fit its shape (an lm_head tied to the embeddings is
not stored, so an adapter that changes it is refused). The model's config and tokenizer come
from the base, as in mergekit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.checkpoint import CheckpointReader, TensorInfo, pickle_refusal
from merging.errors import CheckpointError, SourceError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."  # peft's key prefix for the wrapped transformers model
# The LoRA factors of one module, as peft saves them (adapter name removed, DoRA's ".weight" too).
FACTOR = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A"
                    r"|lora_embedding_B|lora_magnitude_vector)$")
# init_lora_weights values that only initialise A and B; the others rewrite the base weights too.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
ADVICE = "merge it into its base with peft's merge_and_unload and use that folder"


@dataclass(frozen=True)
class Update:
    """What an adapter does to one tensor of the base, in the order peft does it: ``replace`` (the
    adapter's saved copy of the tensor) first, then ``a``/``b`` (a weight's LoRA factors, with
    ``magnitude`` for DoRA) or ``bias`` (``lora_B.bias``) times ``scaling``. Names are the
    adapter's tensor names."""

    replace: str | None = None
    a: str | None = None
    b: str | None = None
    bias: str | None = None
    magnitude: str | None = None
    scaling: float = 1.0
    fan_in_fan_out: bool = False
    embedding: bool = False


def read_config(folder: Path, label: str) -> dict:
    """The adapter's ``adapter_config.json``, checked with ``check_config``; a SourceError says why not.

    Read as JSON, without peft (2 s to import), so a reference is judged before any weight is
    fetched; ``lora_config`` parses it with peft when the adapter is applied.
    """
    path = Path(folder) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{label}: cannot read {ADAPTER_CONFIG} ({exc})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{label}: {ADAPTER_CONFIG} is not a JSON object")
    kind = raw.get("peft_type")
    if kind != "LORA":
        raise SourceError(f"{label} is a PEFT {kind or 'untyped'} adapter; only LoRA adapters (peft_type LORA) "
                          f"can be applied: {ADVICE}")
    problem = check_config(raw)
    if problem:
        raise SourceError(f"{label} uses {problem}, which Merge Studio cannot apply exactly; {ADVICE}")
    return raw


# LoraConfig fields that select a LoRA variant (peft marks them ``is_lora_variant``; DoRA is applied);
# tests/test_lora_refs.py checks this list against the installed peft.
VARIANTS = ("velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config")
UNSUPPORTED = (("layer_replication", "layer replication"), ("target_parameters", "LoRA on parameters"),
               ("trainable_token_indices", "trainable tokens"), ("ensure_weight_tying", "tied adapters"),
               ("use_qalora", "QA-LoRA"), ("megatron_config", "Megatron layers"))


def check_config(config: dict) -> str | None:
    """What in an adapter config (``adapter_config.json`` as a dict) cannot be applied tensor by
    tensor exactly as peft merges it, or None."""
    variant = next((name for name in VARIANTS if config.get(name)), None)
    if variant:
        return f"the LoRA variant {variant}"
    init = config.get("init_lora_weights", True)
    if init == "mica":  # an initialisation that selects a variant (B frozen)
        return "the LoRA variant mica (init_lora_weights)"
    if init not in PLAIN_INITS:
        return (f"init_lora_weights {init!r} without conversion (it rewrites the base weights; peft's "
                "save_pretrained(path_initial_model_for_weight_conversion=...) saves a plain LoRA)")
    for field, what in UNSUPPORTED:
        if config.get(field):
            return f"{what} ({field})"
    return None


def lora_config(folder: Path, label: str):
    """The adapter's ``peft.LoraConfig`` (checked by ``read_config`` first)."""
    read_config(folder, label)
    # Deferred: peft takes ~2 s to import, and recipes without adapters never need it.
    from peft import LoraConfig

    with warnings.catch_warnings():  # peft warns about keys from other versions; we report our own errors
        warnings.simplefilter("ignore")
        try:
            return LoraConfig.from_pretrained(str(folder))
        except Exception as exc:  # peft raises ValueError, TypeError... for a config it cannot build
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SourceError(f"{label}: {ADAPTER_CONFIG} is not a LoRA config peft can read ({reason})") from None


def scaling(config, module: str) -> tuple[int, float]:
    """(r, scaling) of one module: r and lora_alpha from ``rank_pattern``/``alpha_pattern`` (matched by
    peft's own ``get_pattern_key``, as ``LoraModel._create_and_replace`` does), else the config's;
    scaling = lora_alpha / r, or lora_alpha / √r with rsLoRA (peft's ``LoraLayer.update_layer``)."""
    # Deferred: peft takes ~2 s to import, and recipes without adapters never need it.
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def adapter_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """An adapter weight as peft merges it: float16/bfloat16 upcast to float32 (``autocast_adapter_dtype``,
    the default of ``PeftModel.from_pretrained``)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """ΔW = transpose(B·A, fan_in_fan_out) · scaling (peft ``lora.Linear.get_delta_weight``); for an
    embedding (A: r × vocabulary, B: width × r) fan_in_fan_out is True, as in ``lora.Embedding``."""
    # Deferred: peft takes ~2 s to import, and recipes without adapters never need it.
    from peft.utils.other import transpose

    return transpose(adapter_tensor(b) @ adapter_tensor(a), fan_in_fan_out) * scaling


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """DoRA's merged weight m / ‖W + ΔW‖ · (W + ΔW), the norm per output feature, in W's dtype
    (peft ``DoraLinearVariant.merge_unsafe`` with its ``DoraLinearLayer.get_weight_norm``)."""
    # Deferred: peft takes ~2 s to import, and recipes without adapters never need it.
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.utils.other import transpose

    norm = DoraLinearLayer(fan_in_fan_out).get_weight_norm(weight, transpose(delta, fan_in_fan_out), scaling=1)
    factor = transpose((adapter_tensor(magnitude) / norm).view(-1, 1), fan_in_fan_out)
    return (factor * (weight + delta)).to(weight.dtype)


def apply_update(tensor: torch.Tensor, update: Update, read) -> torch.Tensor:
    """One base tensor with the adapter applied (``read(name)`` gives an adapter tensor). Never
    writes into ``tensor``: a pickled checkpoint's reader hands out its own stored tensor."""
    dtype = tensor.dtype
    if update.replace is not None:
        tensor = read(update.replace).to(dtype)  # loading copies the saved tensor into the base's parameter
    if update.bias is not None:
        return (tensor + adapter_tensor(read(update.bias)) * update.scaling).to(dtype)
    if update.a is None:
        return tensor
    delta = lora_delta(read(update.a), read(update.b), update.scaling, update.embedding or update.fan_in_fan_out)
    if update.magnitude is not None:
        return dora_weight(tensor, delta, read(update.magnitude), update.fan_in_fan_out)
    if update.embedding:
        return tensor + delta.to(dtype)  # lora.Embedding.merge casts the delta first
    return (tensor + delta).to(dtype)  # lora.Linear.merge adds in place: float32 sum, stored dtype


def plan_updates(config: dict, adapter: dict[str, TensorInfo], base: dict[str, TensorInfo], label: str) -> dict[str, Update]:
    """Base tensor name -> its ``Update`` (scaling not yet set: ``set_scaling``), checked against the
    base's names and shapes from the headers alone, before any tensor is read.

    A module's orientation follows its stored shape (peft decides fan_in_fan_out by the layer's
    type: True for ``Conv1D``, stored in × out; False for ``nn.Linear``); for a square weight, where
    the shape cannot tell, the config's ``fan_in_fan_out`` does.
    """
    def refuse(why: str, unfit: bool = True) -> CheckpointError:
        return CheckpointError(f"{label}: {why}" + ("; the adapter does not fit this base model" if unfit else ""))

    def shape(name: str) -> tuple[int, ...]:
        return tuple(adapter[name].shape)

    def base_tensor(name: str, key: str) -> TensorInfo:
        if name not in base:
            raise refuse(f"adapter tensor {key} changes {name}, which the base does not store"
                         + (" (its lm_head is tied to the embeddings)" if "lm_head" in name else ""))
        return base[name]

    modules: dict[str, dict[str, str]] = {}
    updates: dict[str, Update] = {}
    for key in adapter:
        if not key.startswith(PREFIX):
            raise refuse(f"adapter tensor {key} is not named as peft names them ({PREFIX}...)")
        match = FACTOR.match(key[len(PREFIX):])
        if match:
            modules.setdefault(match["module"], {})[match["role"]] = key
            continue
        name = re.sub(r"\.base_layer(?=\.\w+$)", "", key[len(PREFIX):])
        if "lora_" in name or ".base_layer." in name:
            raise refuse(f"adapter tensor {key} is of a kind Merge Studio does not apply; {ADVICE}", unfit=False)
        info = base_tensor(name, key)
        if shape(key) != tuple(info.shape):
            raise refuse(f"adapter tensor {key} has shape {list(shape(key))} but {name} is {list(info.shape)}")
        updates[name] = Update(replace=key)
    for module, roles in modules.items():
        embedding = "lora_embedding_A" in roles or "lora_embedding_B" in roles
        a, b = (roles.get("lora_embedding_A"), roles.get("lora_embedding_B")) if embedding else \
            (roles.get("lora_A.weight"), roles.get("lora_B.weight"))
        if a is None or b is None:
            raise refuse(f"module {module} has {', '.join(sorted(roles))} but no lora_A/lora_B pair", unfit=False)
        if len(shape(a)) != 2 or len(shape(b)) != 2 or shape(a)[0] != shape(b)[1]:
            raise refuse(f"{a} {list(shape(a))} and {b} {list(shape(b))} are not a pair of LoRA factors")
        weight_name = f"{module}.weight"
        weight = base_tensor(weight_name, a)
        out_in = (shape(b)[0], shape(a)[1])
        fan_in_fan_out = False
        if embedding:
            fits = tuple(weight.shape) == out_in[::-1]
        else:
            fits = len(weight.shape) == 2 and tuple(weight.shape) in (out_in, out_in[::-1])
            square = out_in[0] == out_in[1]
            fan_in_fan_out = bool(config.get("fan_in_fan_out")) if square else tuple(weight.shape) == out_in[::-1]
        if not fits:
            raise refuse(f"LoRA {a} makes a {list(out_in)} change but {weight_name} is {list(weight.shape)}")
        previous = updates.get(weight_name, Update())
        magnitude = roles.get("lora_magnitude_vector")
        if magnitude is not None:
            if embedding:
                raise refuse(f"{magnitude} is DoRA on an embedding, which Merge Studio does not apply; {ADVICE}",
                             unfit=False)
            if shape(magnitude) != (out_in[0],):
                raise refuse(f"DoRA magnitude {magnitude} has shape {list(shape(magnitude))}, not [{out_in[0]}]")
        updates[weight_name] = dataclasses.replace(previous, a=a, b=b, magnitude=magnitude,
                                                   fan_in_fan_out=fan_in_fan_out, embedding=embedding)
        bias = roles.get("lora_B.bias")
        if bias is not None:
            bias_name = f"{module}.bias"
            info = base_tensor(bias_name, bias)
            if tuple(info.shape) != shape(bias):
                raise refuse(f"lora bias {bias} has shape {list(shape(bias))} but {bias_name} is {list(info.shape)}")
            updates[bias_name] = dataclasses.replace(updates.get(bias_name, Update()), bias=bias)
    return updates


def set_scaling(config, updates: dict[str, Update], adapter: dict[str, TensorInfo], label: str) -> dict[str, Update]:
    """``updates`` with each module's scaling from the ``LoraConfig`` (``scaling``), its rank checked
    against the saved factors (peft would refuse to load a mismatch)."""
    done = {}
    for name, update in updates.items():
        factor = update.a or update.bias
        if factor is not None:
            module = factor[len(PREFIX):].rsplit(".lora_", 1)[0]
            r, scale = scaling(config, module)
            rank = adapter[update.a].shape[0] if update.a else adapter[factor.replace(".bias", ".weight")].shape[1]
            if rank != r:
                raise CheckpointError(f"{label}: {ADAPTER_CONFIG} gives {module} rank {r} but its LoRA factors have "
                                      f"rank {rank}; the adapter's files do not belong together")
            update = dataclasses.replace(update, scaling=scale)
        done[name] = update
    return done


class AdaptedReader:
    """A ``CheckpointReader`` of a base model with a LoRA adapter applied, tensor by tensor.

    Names, shapes and dtypes are the base's. ``get`` reads the base tensor and, for the tensors the
    adapter touches, the few adapter tensors they need, and returns the result: nothing is kept
    between calls, so the merge still holds one tensor per input at a time.
    """

    def __init__(self, base: CheckpointReader, adapter: CheckpointReader, updates: dict[str, Update], label: str):
        self.base, self.adapter, self.updates, self.label = base, adapter, updates, label
        self.folder = base.folder

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.base.get(name)
        update = self.updates.get(name)
        return tensor if update is None else apply_update(tensor, update, self.adapter.get)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def adapter_weights(folder: Path, label: str, *, allow_pickle: bool = False) -> Path:
    """The adapter's weights file: ``adapter_model.safetensors``, or ``adapter_model.bin`` only with
    ``allow_pickle`` (read with ``torch.load(weights_only=True)``)."""
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        return folder / ADAPTER_WEIGHTS
    if (folder / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise SourceError(pickle_refusal(label).replace("pytorch_model.bin", ADAPTER_PICKLE))
        return folder / ADAPTER_PICKLE
    raise SourceError(f"{label} has an {ADAPTER_CONFIG} but no weights ({ADAPTER_WEIGHTS})")


def open_reader(model, *, allow_pickle: bool = False, label: str | None = None):
    """A reader for a resolved model (``merging.sources.ResolvedModel``): its ``CheckpointReader``, or
    for a model with an ``adapter`` an ``AdaptedReader`` whose updates are already checked against
    the base's shapes (headers only: no tensor is read)."""
    label = label or str(model.folder)
    base = CheckpointReader(model.folder, allow_pickle=allow_pickle, label=label)
    if getattr(model, "adapter", None) is None:
        return base
    adapter = None
    try:
        weights = adapter_weights(model.adapter, label, allow_pickle=allow_pickle)
        adapter = CheckpointReader(model.adapter, allow_pickle=allow_pickle, label=label, files=[weights])
        infos = {n: adapter.info(n) for n in adapter.names()}
        updates = plan_updates(read_config(model.adapter, label), infos, {n: base.info(n) for n in base.names()}, label)
        updates = set_scaling(lora_config(model.adapter, label), updates, infos, label)
        return AdaptedReader(base, adapter, updates, label)
    except BaseException:
        base.close()
        if adapter is not None:
            adapter.close()
        raise
