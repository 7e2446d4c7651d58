"""A merged model as a PEFT LoRA adapter on its base: per linear layer, the truncated SVD of merged − base.

For each linear weight, Δ = W_merged − W_base and its best rank-r approximation (Eckart–Young)
Δ_r = U_r S_r V_rᵀ is saved as peft's factors, ``lora_B = U_r √S_r`` and ``lora_A = √S_r V_rᵀ``,
with ``lora_alpha = r`` so that peft's scaling lora_alpha / r is 1 and peft's ΔW = B·A is Δ_r
(Hu et al. 2021, https://arxiv.org/abs/2106.09685; the same extraction as mergekit's
``mergekit-extract-lora`` and LoRD, https://github.com/thomasgauthier/LoRD). The relative error
‖Δ − Δ_r‖_F / ‖Δ‖_F = √(Σ_{i>r} σᵢ²) / √(Σ σᵢ²) is reported per layer and over all layers.

Decisions:
- The SVD runs in float64. A merge's Δ is small next to W and its spectrum falls over orders of
  magnitude; in float32 the tail singular values sit at rounding noise (~1e-7 σ₁), so the reported
  error at high ranks would be noise, and the full-rank adapter would not reproduce Δ to float32
  rounding. Δ itself is formed in float64 from the stored tensors, which is exact. The cost is small:
  a 576 × 1536 layer (SmolLM2-135M's MLP) took 0.70 s in float64 against 0.44 s in float32 on two
  shared CPU cores, so the demo model's 210 layers take 2-3 minutes on CPU (``--device cuda`` for more).
- S is split evenly (√S into each factor): the two factors then have equal norms, which keeps
  them in range if someone casts them to float16 and is the balanced start LoRA training expects.
- Factors are saved in float32: peft upcasts adapter weights to float32 when loading
  (``autocast_adapter_dtype``), so a 16-bit file would only add rounding for half of a small file.
- A layer whose Δ is exactly zero is skipped (peft leaves an untargeted layer as the base's).
  A layer narrower than r gets its full rank, written in ``rank_pattern``/``alpha_pattern``.
- Which tensors are linear layers comes from the architecture itself, built on the meta device
  (``merging.runtime.meta_model``): ``nn.Linear`` (stored out × in) and GPT-2's ``Conv1D``
  (stored in × out: its Δ is transposed for the SVD, and peft's ``fan_in_fan_out`` handles it).
- Other tensors that changed (embeddings, norms, biases, an lm_head tied to the embeddings) cannot be
  expressed by LoRA on linear layers. They are left out and reported with their share of ‖Δ‖².
  peft's ``modules_to_save`` would copy them whole, but it copies whole modules, and under tied
  embeddings the lm_head keeps reading the base's weight, so the copy would silently be wrong:
  left out and said is the honest answer.

Factors are kept in memory until written (r·(out + in) floats per layer: 2% of a 7B model at
r = 64 in float32); the weights are read one tensor at a time with the project's readers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from merging.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, open_reader
from merging.checkpoint import atomic_output
from merging.errors import CheckpointError, MergeStudioError, check_cancel
from merging.runtime import meta_model, pick_device
from merging.sources import SourcePolicy, resolve_model


@dataclass(frozen=True)
class LayerFit:
    """One linear layer's rank-r fit: its ``name`` (the module), ``rank`` and relative error."""

    name: str
    rank: int
    relative_error: float
    delta_norm: float  # ‖Δ‖_F


@dataclass
class LoraExport:
    """What ``extract_lora`` wrote and how well it fits."""

    output: Path
    rank: int
    bytes: int
    layers: list[LayerFit]
    relative_error: float  # over all linear layers: √(Σ tail²) / √(Σ ‖Δ‖²)
    left_out: list[str] = field(default_factory=list)  # changed tensors LoRA cannot express
    left_out_share: float = 0.0  # their share of the whole ‖Δ‖² (linear layers + left out)

    def summary(self) -> dict:
        return {"output": str(self.output), "rank": self.rank, "bytes": self.bytes, "layers": len(self.layers),
                "relative_error": self.relative_error, "left_out": self.left_out,
                "left_out_share": self.left_out_share, "per_layer": [asdict(layer) for layer in self.layers]}

    def describe(self) -> str:
        """One paragraph for people: size, fit, and what is not in the adapter."""
        text = (f"rank {self.rank} LoRA on {len(self.layers)} linear layers, {self.bytes / 2**20:.2f} MiB; "
                f"relative reconstruction error ‖Δ − Δ_r‖/‖Δ‖ = {self.relative_error:.4g}")
        if self.left_out:
            names = ", ".join(self.left_out[:5]) + (", ..." if len(self.left_out) > 5 else "")
            text += (f". Left out ({len(self.left_out)} changed tensors that are not linear layers, "
                     f"{self.left_out_share:.2%} of ‖Δ‖²): {names}")
        return text


def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, relative error) of Δ (out × in) at ``rank``: Δ ≈ B·A with B = U_r √S_r, A = √S_r V_rᵀ,
    the best rank-r approximation in Frobenius norm (Eckart–Young), and
    ‖Δ − B·A‖_F / ‖Δ‖_F = √(Σ_{i>r} σᵢ²) / √(Σ σᵢ²). Computed in float64, factors in float32."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    total = float(s.square().sum())
    error = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), error


def linear_modules(config: dict, label: str) -> dict[str, bool]:
    """Module name -> fan_in_fan_out for every linear layer of the architecture (``nn.Linear``: False;
    GPT-2's ``Conv1D``, stored in × out: True), leaving out layers whose weight is tied to another
    (an lm_head tied to the embeddings: LoRA on it would change the embeddings too)."""
    # Deferred: transformers takes seconds to import.
    from transformers.pytorch_utils import Conv1D

    model = meta_model(config)
    if model is None:
        raise CheckpointError(f"{label}: transformers does not know the architecture {config.get('architectures')}, "
                              "so its linear layers cannot be found")
    owners: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    return {name: isinstance(module, Conv1D) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and owners[id(module.weight)] == 1}


def check_pair(merged, base, merged_ref: str, base_ref: str) -> None:
    """The merged model and the base must be one architecture (tensors and shapes are checked while reading)."""
    if merged.architecture != base.architecture:
        raise CheckpointError(f"{merged_ref} is a {merged.architecture} but {base_ref} is a {base.architecture}: "
                              "different architectures; extract a LoRA against the base the model was merged from")


def extract_lora(merged_ref: str, base_ref: str, out_dir: str | Path, rank: int, *, device: str = "auto",
                 overwrite: bool = False, policy: SourcePolicy = SourcePolicy(), cancel=None,
                 progress=None) -> LoraExport:
    """Write ``out_dir`` (``adapter_config.json`` + ``adapter_model.safetensors``): a PEFT LoRA adapter
    of rank ``rank`` that turns ``base_ref`` into (approximately) ``merged_ref``, per linear layer the
    truncated SVD of W_merged − W_base. ``progress(done, total, name)`` after each tensor."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeStudioError(f"rank must be a whole number of at least 1, got {rank!r}")
    merged, base = resolve_model(merged_ref, policy), resolve_model(base_ref, policy)
    check_pair(merged, base, merged_ref, base_ref)
    linear = linear_modules(base.config, base_ref)
    compute = pick_device(device)
    protected = [m.folder for m in (merged, base)] + [m.adapter for m in (merged, base) if m.adapter is not None]
    # Entered first, so a bad output folder is refused before any tensor is read.
    with atomic_output(Path(out_dir), overwrite=overwrite, protected=protected) as temp:
        readers = []
        try:
            readers = [open_reader(merged, allow_pickle=policy.allow_pickle, label=merged_ref),
                       open_reader(base, allow_pickle=policy.allow_pickle, label=base_ref)]
            factors, layers, left_out, left_norm = fit_layers(*readers, linear, rank, compute, merged_ref, base_ref,
                                                              cancel, progress)
        finally:
            for reader in readers:
                reader.close()
        write_adapter(temp, factors, layers, rank, base_ref, fan_in_fan_out=any(linear[f.name] for f in layers))
        size = sum(path.stat().st_size for path in temp.iterdir())
    tail = sum((fit.relative_error * fit.delta_norm) ** 2 for fit in layers)
    linear_norm = sum(fit.delta_norm ** 2 for fit in layers)
    whole = linear_norm + left_norm
    return LoraExport(Path(out_dir), rank, size, layers, math.sqrt(tail / linear_norm) if linear_norm else 0.0,
                      left_out, left_norm / whole if whole else 0.0)


def fit_layers(merged, base, linear: dict[str, bool], rank: int, compute: torch.device, merged_ref: str,
               base_ref: str, cancel, progress):
    """Read both models tensor by tensor: the factors of every changed linear layer (module -> (B, A)),
    their ``LayerFit``s, the names of the other changed tensors and their ‖Δ‖²."""
    names = merged.names()
    if set(names) != set(base.names()):
        extra = min(set(names) ^ set(base.names()))
        raise CheckpointError(f"{merged_ref} and {base_ref} do not hold the same tensors (e.g. {extra}); "
                              "they are different architectures")
    factors, layers, left_out, left_norm = {}, [], [], 0.0
    for done, name in enumerate(names, 1):
        check_cancel(cancel, "LoRA extraction stopped; nothing was written")
        if merged.info(name).shape != base.info(name).shape:
            raise CheckpointError(f"tensor {name} is {list(merged.info(name).shape)} in {merged_ref} but "
                                  f"{list(base.info(name).shape)} in {base_ref}; they are different architectures")
        delta = None
        if merged.info(name).dtype.is_floating_point:
            delta = merged.get(name).to(compute, torch.float64) - base.get(name).to(compute, torch.float64)
        module, _, kind = name.rpartition(".")
        if delta is None or not bool(delta.any()):
            pass  # unchanged (or an integer buffer): nothing to carry
        elif kind == "weight" and module in linear:
            delta = delta.T if linear[module] else delta  # Conv1D stores in × out; the SVD takes out × in
            b, a, error = lora_factors(delta, min(rank, *delta.shape))
            factors[module] = (b.cpu(), a.cpu())
            layers.append(LayerFit(module, b.shape[1], error, float(delta.norm())))
        else:
            left_out.append(name)
            left_norm += float(delta.square().sum())
        if progress is not None:
            progress(done, len(names), name)
    if not layers:
        raise MergeStudioError(f"no linear layer differs between {merged_ref} and {base_ref}; "
                               "there is nothing for a LoRA adapter to hold")
    return factors, layers, left_out, left_norm


def write_adapter(folder: Path, factors: dict, layers: list[LayerFit], rank: int, base_ref: str, *,
                  fan_in_fan_out: bool) -> None:
    """``adapter_model.safetensors`` under peft's key names and ``adapter_config.json`` written by peft's
    own ``LoraConfig``: lora_alpha = r (scaling 1), layers narrower than r in rank/alpha_pattern."""
    # Deferred: peft takes ~2 s to import, and safetensors' writer is only needed here.
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {}
    for module, (b, a) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    # Full module names: peft matches a name exactly or as a suffix after a dot, so nothing else matches.
    narrower = {fit.name: fit.rank for fit in layers if fit.rank != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=[fit.name for fit in layers],
                        rank_pattern=narrower, alpha_pattern=dict(narrower), lora_dropout=0.0, bias="none",
                        fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM", base_model_name_or_path=base_ref)
    with warnings.catch_warnings():  # peft may warn about settings that matter only for training
        warnings.simplefilter("ignore")
        config.save_pretrained(str(folder))
    if not (folder / ADAPTER_CONFIG).is_file():  # peft's format is the contract: fail loudly if it moves
        raise CheckpointError(f"peft did not write {ADAPTER_CONFIG}; this peft version saves adapters differently")
