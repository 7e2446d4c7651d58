"""Low-rank adapters (LoRA, Hu et al. 2021) for training the demo experts, and their merging.

W' = W + (alpha / rank) · B A on every linear projection of the decoder (attention q/k/v/o, MLP
gate/up/down). Spreading the update over all of them keeps each weight's change small (about
1% of its norm), the regime in which merging and DARE work; the adapters stay small enough to
ship in the repository (rank 8: ~2.4M parameters, ~5 MB in bf16). An expert checkpoint is the
base with B A folded into its weights, so it loads with plain ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, B starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap every target projection; returns the wrappers by weight prefix."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha, generator)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    return wrapped


def save_adapter(path: Path, wrapped: dict[str, LoRALinear], rank: int, alpha: float, metadata: dict[str, str]) -> None:
    """Save A and B per projection (bf16: ~5 MB at rank 8) with rank and alpha in the metadata."""
    tensors = {}
    for prefix, lora in wrapped.items():
        tensors[f"{prefix}.lora_A"] = lora.lora_A.detach().to(torch.bfloat16).contiguous()
        tensors[f"{prefix}.lora_B"] = lora.lora_B.detach().to(torch.bfloat16).contiguous()
    save_file(tensors, str(path), metadata={"rank": str(rank), "alpha": str(alpha), **metadata})


def adapter_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha / rank) · B A for every adapted weight, keyed by the weight's name."""
    with safe_open(str(path), framework="pt") as adapter:
        meta = adapter.metadata()
        scale = float(meta["alpha"]) / int(meta["rank"])
        prefixes = sorted({key.rsplit(".", 1)[0] for key in adapter.keys()})
        return {
            f"{prefix}.weight": scale * adapter.get_tensor(f"{prefix}.lora_B").float() @ adapter.get_tensor(f"{prefix}.lora_A").float()
            for prefix in prefixes
        }
