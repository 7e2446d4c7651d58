"""The output's tokenizer and the embedding rows that follow it: mergekit's ``tokenizer_source`` /
``tokenizer:`` and ``chat_template``.

Without a tokenizer setting the output copies the tokenizer files of its reference model and
every model must have the same vocabulary. With one (mergekit 0.1.5's behaviour):

- the output tokenizer is the base's (``base``; tokens the base's config does not count are
  dropped), a named model's (``<model>``), or the ``union`` of every model's tokens (the base's
  first, then each other model's in order, added tokens with their settings), plus any token the
  ``tokens:`` block names;
- every model's vocabulary tensors (embeddings, ``lm_head``) are re-indexed to that tokenizer:
  a token keeps its own row in each model that has it; a row a model lacks is the row of the
  only model that has it, else the base's, else the mean over the models that have it, else
  zeros, or what ``tokens: {tok: {source: ..., force: ...}}`` says;
- the tensors are sized to the output tokenizer's length, rounded up to ``pad_to_multiple_of``
  (the padding rows are the mean embedding), and ``vocab_size`` in the config follows. This is
  what mergekit's users met in its issue #425: a model whose embeddings carry padding rows
  beyond its tokenizer loses them unless ``pad_to_multiple_of`` keeps the size.

``chat_template``: ``auto`` (the template most of the models share), a built-in name
(``chatml``, ``llama3``, ``alpaca``, ``mistral``: ``merging/chat_templates/``), or a Jinja
template; the output's tokenizer is then written with it.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging.errors import RecipeError
from merging.recipe import Recipe

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
VOCABULARY_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out")


def is_vocabulary_tensor(name: str, shape: tuple[int, ...], vocab_size: int | None) -> bool:
    """Whether a tensor is indexed by token along its first axis (embeddings, lm_head)."""
    return bool(shape) and any(part in name for part in VOCABULARY_NAMES) and (vocab_size is None or shape[0] == vocab_size)


@dataclass
class Vocabulary:
    """The output tokenizer and, per model, where each of its tokens sits in that model."""

    tokenizer: object  # a transformers tokenizer, written into the output
    size: int  # rows of the output's vocabulary tensors (padded)
    permutations: dict[str, list[int]]  # model reference -> per output token id, that model's id or -1
    original: dict[str, dict[str, int]]  # model reference -> its own vocabulary
    base: str | None
    tokens: dict[str, dict] = field(default_factory=dict)  # the recipe's tokens: block

    def align(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's vocabulary tensor (tokens along axis 0) re-indexed to the output tokenizer."""
        models = list(tensors)
        vocab = self.tokenizer.get_vocab()
        dtype = tensors[models[0]].dtype
        for tensor in tensors.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
        shape = tensors[models[0]].shape[1:]
        if any(t.shape[1:] != shape for t in tensors.values()):
            raise RecipeError("the vocabulary tensors differ beyond their token axis: "
                              + ", ".join(f"{m} {list(t.shape)}" for m, t in tensors.items()))
        defaults = self._default_rows(tensors, models, vocab, dtype)
        forced = {vocab[t] for t, cfg in self.tokens.items() if (cfg or {}).get("force") and t in vocab}
        aligned = {}
        for model in models:
            rows = torch.zeros((self.size, *shape), dtype=dtype, device=tensors[model].device)
            source = torch.tensor(self.permutations[model], dtype=torch.long)
            own = torch.nonzero(source >= 0).flatten()
            rows[own] = tensors[model][source[own].to(tensors[model].device)].to(dtype)
            for token, row in defaults.items():
                token_id = vocab[token]
                if source[token_id] < 0 or token_id in forced:
                    rows[token_id] = row
            if self.size > len(vocab):  # padding rows: the mean embedding (as mergekit)
                rows[len(vocab):] = rows[: len(vocab)].mean(dim=0)
            aligned[model] = rows
        return aligned

    def _default_rows(self, tensors, models, vocab, dtype) -> dict[str, torch.Tensor]:
        """The row of every token some model lacks (or the recipe forces), by mergekit's rules."""
        rows = {}
        for token, token_id in vocab.items():
            cfg = self.tokens.get(token) or {}
            present = [m for m in models if self.permutations[m][token_id] >= 0]
            if len(present) == len(models) and not cfg.get("force"):
                continue
            source = cfg.get("source")
            if source is not None:
                rows[token] = self._configured_row(tensors, token, token_id, source)
            elif len(present) == 1:
                rows[token] = tensors[present[0]][self.permutations[present[0]][token_id]].to(dtype)
            elif not present:
                rows[token] = torch.zeros(tensors[models[0]].shape[1:], dtype=dtype)
            elif self.base in present:
                rows[token] = tensors[self.base][self.permutations[self.base][token_id]].to(dtype)
            else:
                rows[token] = sum(tensors[m][self.permutations[m][token_id]].to(dtype) for m in present) / len(present)
        return rows

    def _configured_row(self, tensors, token: str, token_id: int, source) -> torch.Tensor:
        """A ``tokens:`` entry's source: ``{kind: zero}``, a model (its row for this token), or
        ``{kind: model_token, model, token | token_id}``."""
        first = next(iter(tensors.values()))
        if isinstance(source, dict) and source.get("kind") == "zero":
            return first.new_zeros(first.shape[1:])
        if isinstance(source, dict) and source.get("kind") == "model_token":
            model = source.get("model")
            if model not in tensors:
                raise RecipeError(f"tokenizer.tokens[{token!r}]: model {model!r} is not one of the merged models")
            src = source.get("token_id")
            if src is None:
                src = self.original[model].get(source.get("token"))
            if src is None or not 0 <= src < tensors[model].shape[0]:
                raise RecipeError(f"tokenizer.tokens[{token!r}]: {source.get('token', src)!r} is not a token of {model}")
            return tensors[model][src]
        if not isinstance(source, str) or source not in tensors:
            raise RecipeError(f"tokenizer.tokens[{token!r}].source must be a merged model, {{kind: zero}} or "
                              f"{{kind: model_token, model, token}}, not {source!r}")
        src = self.permutations[source][token_id]
        if src < 0:
            raise RecipeError(f"tokenizer.tokens[{token!r}]: {source} has no such token")
        return tensors[source][src]


def build_vocabulary(recipe: Recipe, folders: dict[str, Path], reference: str, vocab_sizes: dict[str, int],
                     source_folder: Path) -> Vocabulary | None:
    """The output vocabulary of a recipe with a tokenizer setting (None without one).

    ``folders``: model reference -> local folder of every merged model; ``reference``: the base
    (else the first model); ``vocab_sizes``: each model's config ``vocab_size``;
    ``source_folder``: the folder of a ``tokenizer_source`` model.
    """
    settings = recipe.tokenizer
    if settings is None:
        return None
    # Deferred: transformers takes seconds to import; only recipes with a tokenizer setting need it.
    from transformers import AutoTokenizer

    def load(folder: Path):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)

    tokenizers = {reference: _stripped(load(folders[reference]), vocab_sizes.get(reference))}
    for ref, folder in folders.items():
        if ref not in tokenizers:
            try:
                tokenizers[ref] = load(folder)
            except (OSError, ValueError):  # no tokenizer files: assumed the base's, as mergekit does
                continue
    if settings.source == "base":
        out = tokenizers[reference]
    elif settings.source == "union":
        out = _union(tokenizers[reference], tokenizers, vocab_sizes)
    else:
        out = load(source_folder)
    for token in settings.tokens:
        if token not in out.get_vocab():
            out.add_tokens(token)
    vocab = out.get_vocab()
    size = len(vocab)
    pad = settings.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    permutations = {}
    for ref in folders:
        own = (tokenizers.get(ref) or tokenizers[reference]).get_vocab()
        limit = vocab_sizes.get(ref) or len(own)
        order = [-1] * len(vocab)
        for token, new_id in vocab.items():
            old_id = own.get(token, -1)
            order[new_id] = old_id if old_id < limit else -1
        permutations[ref] = order
    return Vocabulary(out, size, permutations, {ref: tok.get_vocab() for ref, tok in tokenizers.items()},
                      recipe.base_model, dict(settings.tokens))


def _stripped(tokenizer, vocab_size: int | None):
    """The tokenizer without tokens at or above the model's ``vocab_size`` (ids it has no row for)."""
    vocab = tokenizer.get_vocab()
    unused = {token for token, index in vocab.items() if vocab_size is not None and index >= vocab_size}
    if not unused:
        return tokenizer
    # Deferred: only a tokenizer larger than its model needs the tokenizers library directly.
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if data is None or data["model"]["type"] != "BPE":
        raise RecipeError("the base's tokenizer has tokens beyond its model's vocab_size and is not a fast BPE "
                          "tokenizer, so they cannot be dropped; use tokenizer_source: union or a model")
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < vocab_size]
    data["model"]["vocab"] = {token: index for token, index in data["model"]["vocab"].items() if token not in unused}
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base, tokenizers: dict, vocab_sizes: dict[str, int]):
    """The base's tokenizer plus every other model's tokens (ordinary tokens first, then added
    tokens with their settings), each once, in the models' order."""
    # Deferred: transformers takes seconds to import; only a union needs a fresh tokenizer.
    from transformers import AutoTokenizer

    ordinary, added = {}, {}
    for ref, tokenizer in tokenizers.items():
        limit = vocab_sizes.get(ref) or tokenizer.vocab_size
        special = tokenizer.added_tokens_decoder
        special_names = {info.content for info in special.values()}
        for token, index in tokenizer.get_vocab().items():
            if index < limit and token not in special_names:
                ordinary.setdefault(token, None)
        for index, info in special.items():
            if index < limit:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as copy:  # a fresh copy: the base's own tokenizer stays as it is
        base.save_pretrained(copy)
        out = AutoTokenizer.from_pretrained(copy, trust_remote_code=False, local_files_only=True)
    known = base.get_vocab()
    for token in ordinary:
        if token not in added and token not in known:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def chat_template_text(setting: str, tokenizers: list) -> str | None:
    """The chat template ``setting`` names: ``auto`` (the one most input tokenizers share; None
    when none has one), a built-in name, or the Jinja text itself."""
    if setting == "auto":
        found = [t.chat_template.strip() for t in tokenizers if isinstance(getattr(t, "chat_template", None), str)
                 and t.chat_template.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    builtin = TEMPLATES / f"{setting}.jinja"
    if len(setting) < 256 and "\n" not in setting and "{" not in setting:
        if builtin.is_file():
            return builtin.read_text(encoding="utf-8")
        names = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
        raise RecipeError(f"chat_template {setting!r} is not a built-in template ({names}), 'auto' or a Jinja template")
    return setting


def output_tokenizer(recipe: Recipe, vocabulary: Vocabulary | None, tokenizer_folder: Path, folders: list[Path]):
    """The tokenizer to write into the output, or None to copy the tokenizer files unchanged: the
    aligned vocabulary's tokenizer, or the tokenizer source's, with the recipe's chat template set."""
    if vocabulary is None and not recipe.chat_template:
        return None
    # Deferred: transformers takes seconds to import; only these recipes write a tokenizer.
    from transformers import AutoTokenizer

    def load(folder: Path):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)

    tokenizer = vocabulary.tokenizer if vocabulary is not None else load(tokenizer_folder)
    if recipe.chat_template:
        inputs = []
        if recipe.chat_template == "auto":
            for folder in folders:
                try:
                    inputs.append(load(folder))
                except (OSError, ValueError):  # a model without tokenizer files has no template to count
                    continue
        template = chat_template_text(recipe.chat_template, inputs)
        if template is not None:
            tokenizer.chat_template = template
    return tokenizer
