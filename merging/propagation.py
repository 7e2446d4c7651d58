"""RegMean++'s statistics (Nguyen et al. 2025, https://arxiv.org/abs/2508.03121): each model's
linear-layer input Grams when its calibration text flows through the already *merged* earlier
layers, not through the model alone.

RegMean computes model i's Grams on model i by itself, so a layer is merged for inputs the merged
model never sees: the merged earlier layers change them. RegMean++ merges layer by layer:

- X⁽⁰⁾ᵢ: model i's calibration text through the merged embeddings (everything outside the decoder
  layers is merged first; only linear weights take RegMean's solve, the rest a weighted mean);
- for layer l, model i's Grams are the inputs of *its own* layer l's linear layers fed X⁽ˡ⁾ᵢ;
  layer l is merged from them by RegMean's solve (the engine's own ``merge`` callback, so the
  layer used here is exactly the one written, in the output dtype);
- X⁽ˡ⁺¹⁾ᵢ = merged layer l applied to X⁽ˡ⁾ᵢ;
- linear layers after the decoder layers (the output head) get their Grams from one last pass of
  the fully merged model.

One model sits in memory (the shell that becomes the merged model layer by layer), plus every
model's hidden states at the current layer (tokens × width each: 3 models × 128 examples × 256
tokens × 576 wide is 226 MB in float32) and one layer's Grams at a time; each layer runs twice
per model (statistics, then propagation), about four times RegMean's forward cost in all.
Decoder layers are called directly with the arguments the model passed them on a capture pass
(masks, rotary embeddings), so any architecture whose layers are a ``ModuleList`` works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from merging.errors import MergeCancelled, MergeStudioError, check_cancel
from merging.grams import CANCELLED, GramRecorder

Stats = tuple[torch.Tensor, bool] | None  # per model: (Gram XᵀX/N in float64, weight stored (in, out)), or None
ReadFn = Callable[[int, str], torch.Tensor]  # (model index, tensor name) -> that model's tensor
MergeFn = Callable[[str, list[Stats]], torch.Tensor]  # (tensor name, per-model stats) -> the merged tensor, as written


class _StopForward(Exception):
    """Ends a capture pass once the decoder layers' inputs are recorded (the output head is costly)."""


@dataclass
class _Batch:
    hidden: torch.Tensor  # the hidden states entering the current layer
    mask: torch.Tensor  # non-padding positions, flattened
    calls: list[tuple[tuple, dict]]  # per decoder layer: the other positional and keyword arguments it was given


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(name, module list) of the model's decoder layers: the ``ModuleList`` holding most parameters."""
    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > size:
                best, size = (name, module), count
    if best is None:
        raise MergeStudioError("RegMean++ needs a model made of a list of layers; this architecture has none")
    return best


Batches = list[tuple[torch.Tensor, torch.Tensor]]  # one model's calibration text: (input ids, attention mask) per batch


@torch.no_grad()  # the shell's parameters are overwritten in place
def propagated_grams(model, texts: list[Batches], stored_name: Callable[[str], str | None],
                     read: ReadFn, merge: MergeFn, linear_layers: list[tuple[str, torch.nn.Module, bool]],
                     progress: Callable[[str, int, int], None] | None = None, cancel=None) -> list[tuple[dict, dict, int]]:
    """Per model: ({owner module: XᵀX/N}, {module: owner module}, N tokens), RegMean++'s Grams.

    ``model`` is the shell (any one of the models, loaded; it is overwritten layer by layer);
    ``texts``: each model's calibration text, encoded by its own tokenizer; ``stored_name`` maps a loaded parameter name
    to the checkpoint's (None: not stored, as a tied output head); ``read(i, name)`` reads model
    i's tensor; ``merge(name, stats)`` returns the merged tensor as the merge writes it.
    """
    prefix, layers = decoder_layers(model)
    device = next(model.parameters()).device
    transposed = {name: t for name, _, t in linear_layers}
    count = len(texts)
    inside = [(name, p) for name, p in model.named_parameters() if name.startswith(prefix + ".")]
    outside = [(name, p) for name, p in model.named_parameters() if not name.startswith(prefix + ".")]

    def set_param(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value.to(param.device, param.dtype))

    # 1. everything outside the decoder layers: merged (no Grams yet: the output head's come last,
    #    and its value does not reach any layer's input)
    for name, param in outside:
        key = stored_name(name)
        if key is not None:
            set_param(param, merge(key, [None] * count))

    # 2. a capture pass per model: the first layer's inputs and every layer's other arguments
    batches: list[list[_Batch]] = []
    tokens: list[int] = []
    for index in range(count):
        check_cancel(cancel, CANCELLED, MergeCancelled)
        batches.append(_capture(model, layers, texts[index], device))
        tokens.append(int(sum(int(b.mask.sum()) for b in batches[index])))

    results: list[tuple[dict, dict, int]] = [({}, {}, tokens[i]) for i in range(count)]

    def record(index: int, recorder: GramRecorder) -> None:
        grams, owners, total = results[index]
        for name, gram in recorder.grams.items():
            grams[name] = gram.div_(max(1, total))
        owners.update(recorder.owner)

    # 3. layer by layer: each model's own layer on its propagated inputs, merge, propagate
    for number, layer in enumerate(layers):
        layer_prefix = f"{prefix}.{number}."
        members = [(n, p) for n, p in inside if n.startswith(layer_prefix)]
        linear = [(name, module) for name, module, _ in linear_layers if name.startswith(layer_prefix)]
        for index in range(count):
            check_cancel(cancel, CANCELLED, MergeCancelled)
            for name, param in members:
                set_param(param, read(index, stored_name(name)))
            recorder = GramRecorder(linear)
            try:
                for batch in batches[index]:
                    recorder.mask = batch.mask
                    args, kwargs = batch.calls[number]
                    layer(batch.hidden, *args, **kwargs)
                    recorder.batch_done()
            finally:
                recorder.remove()
            record(index, recorder)
        for name, param in members:
            key = stored_name(name)
            module = name.rsplit(".", 1)[0]
            stats = _stats_for(name, module, results, transposed)
            set_param(param, merge(key, stats))
        for index in range(count):
            for batch in batches[index]:
                args, kwargs = batch.calls[number]
                output = layer(batch.hidden, *args, **kwargs)
                batch.hidden = output[0] if isinstance(output, tuple) else output
        for index in range(count):
            for name in [n for n in results[index][0] if n.startswith(layer_prefix)]:
                results[index][0][name] = results[index][0][name].cpu()
        if progress is not None:
            progress("merged layers", number + 1, len(layers))

    # 4. linear layers after the decoder layers (the output head, when stored): one pass of the merged model
    after = [(name, module) for name, module, _ in linear_layers
             if not name.startswith(prefix + ".") and stored_name(f"{name}.weight") is not None]
    if after:
        for index in range(count):
            check_cancel(cancel, CANCELLED, MergeCancelled)
            recorder = GramRecorder(after)
            try:
                for input_ids, attention in texts[index]:
                    recorder.mask = attention.reshape(-1).bool().to(device)
                    model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
                    recorder.batch_done()
            finally:
                recorder.remove()
            record(index, recorder)
    return [({n: g.cpu() for n, g in grams.items()}, owners, total) for grams, owners, total in results]


def _stats_for(name: str, module: str, results, transposed: dict[str, bool]) -> list[Stats]:
    """Each model's statistics for parameter ``name``: its layer's Gram for a linear weight, else None."""
    if not name.endswith(".weight") or module not in transposed:
        return [None] * len(results)
    stats: list[Stats] = []
    for grams, owners, _ in results:
        owner = owners.get(module)
        stats.append(None if owner is None or owner not in grams else (grams[owner], transposed[module]))
    return stats


def _capture(model, layers: torch.nn.ModuleList, batches, device) -> list[_Batch]:
    """Run the shell on each batch up to its last decoder layer, recording the first layer's
    input and the arguments every layer is called with (they depend only on the text)."""
    captured: list[_Batch] = []
    for input_ids, attention in batches:
        calls: list[tuple[tuple, dict]] = []
        first: list[torch.Tensor] = []

        def hook(module, args, kwargs, calls=calls, first=first):
            kwargs = dict(kwargs)  # the layer still runs with its own arguments
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if not calls:
                first.append(hidden)
            calls.append((tuple(args[1:]), dict(kwargs)))
            if len(calls) == len(layers):
                raise _StopForward

        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
        try:
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(calls) != len(layers):
            raise MergeStudioError(f"RegMean++: the model called {len(calls)} of its {len(layers)} layers on the calibration text")
        captured.append(_Batch(first[0], attention.reshape(-1).bool().to(device), calls))
    return captured

