"""Recording what linear layers read: the Gram matrices XᵀX of their inputs (RegMean's
statistics, ``merging.calibration``; RegMean++'s, ``merging.propagation``) and the padded
batches they are recorded on."""

from __future__ import annotations

import torch

CANCELLED = "merge cancelled during calibration; nothing was written"
TOKENS_PER_BATCH = 4096  # Gram batches: padded tokens per forward pass


class GramRecorder:
    """Forward pre-hooks on linear layers that accumulate XᵀX of their inputs in float64,
    padding positions left out (``mask``: the batch's non-padding positions, flattened).

    On the first batch, a layer whose input is the very tensor object its sibling (same parent
    module) just read shares that sibling's Gram (``owner``); only owners accumulate.
    """

    def __init__(self, layers: list[tuple[str, torch.nn.Module]]):
        self.owner: dict[str, str] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self._first = True
        self._last_input: dict[str, tuple[torch.Tensor, str]] = {}
        self._handles = [module.register_forward_pre_hook(self._hook_for(name)) for name, module in layers]

    def batch_done(self) -> None:
        self._first = False
        self._last_input.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook_for(self, name: str):
        parent = name.rsplit(".", 1)[0] if "." in name else ""

        def hook(module, args):
            x = args[0]
            if self._first:
                seen = self._last_input.get(parent)
                if seen is not None and seen[0] is x:
                    self.owner[name] = seen[1]
                else:
                    self.owner[name] = name
                    self._last_input[parent] = (x, name)
            if self.owner.get(name) != name:
                return
            rows = x.reshape(-1, x.shape[-1])
            if self.mask is not None and self.mask.numel() == rows.shape[0]:
                rows = rows[self.mask]
            rows = rows.double()  # float64: see ``merging.calibration``
            if name not in self.grams:
                self.grams[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
            self.grams[name].addmm_(rows.T, rows)

        return hook


def padded_batch(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of a batch, right padded: positions stay those of a lone example."""
    length = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    return input_ids, attention


def similar_length_batches(encoded: list[list[int]], budget: int = TOKENS_PER_BATCH):
    """Batches of similar length (sorted), at most ``budget`` padded tokens each."""
    order = sorted(encoded, key=len)
    batch: list[list[int]] = []
    for ids in order:
        if batch and (len(batch) + 1) * len(ids) > budget:
            yield batch
            batch = []
        batch.append(ids)
    if batch:
        yield batch
