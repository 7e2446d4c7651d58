"""Random homologous model families for tests and benchmarks.

Nothing can be downloaded from the Hugging Face Hub in our test and benchmark
environments, so this module builds everything locally:

* :func:`build_tokenizer` writes a small, real, deterministic byte-level BPE
  tokenizer that ``AutoTokenizer.from_pretrained`` can load.
* :func:`build_family` writes a randomly initialised *base* model plus a number
  of "fine-tunes" (small random perturbations of the base), each as a regular
  ``save_pretrained`` safetensors checkpoint with config, generation config and
  tokenizer, i.e. exactly what a model merger (ours or mergekit) consumes.

Families are cached: a JSON stamp of the build arguments is written into the
family root, and a later call with identical arguments reuses the checkpoints.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Family", "build_tokenizer", "build_family", "SUPPORTED_ARCHS"]

#: Bump when the on-disk output of :func:`build_family` changes, to invalidate caches.
_BUILDER_VERSION = 1
_STAMP_NAME = "family.json"

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral", "gpt2")

_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Characters in rough English frequency order; used to give the most useful
# tokens the lowest ids, so that small vocabularies still cover plain text.
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"


@dataclass(frozen=True)
class Family:
    """A homologous model family on disk: one base checkpoint and its fine-tunes.

    ``base`` is ``root/"base"``; ``finetuned`` is ``[root/"ft1", root/"ft2", ...]``.
    """

    base: Path
    finetuned: list[Path]


# --------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols, most useful first (letters, space, digits, ASCII, rest)."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    # GPT-2's byte -> unicode map: printable ASCII maps to itself, space to "Ġ", newline to "Ċ".
    preferred = list(_LETTERS) + ["Ġ"] + list(_LETTERS.upper()) + list("0123456789")
    preferred += [chr(c) for c in range(33, 127)] + ["Ċ"]
    ordered: list[str] = []
    for ch in preferred:
        if ch in alphabet and ch not in ordered:
            ordered.append(ch)
    ordered += sorted(alphabet.difference(ordered))
    return ordered


def _merges(n: int) -> list[tuple[str, str]]:
    """``n`` deterministic BPE merges over lowercase letters (optionally with a leading "Ġ").

    Level 2 merges build two-character tokens, level k+1 merges append one letter to a
    level-k token; each merge only uses tokens created earlier, so the list is valid BPE.
    """
    if n <= 0:
        return []
    firsts = ["Ġ"] + list(_LETTERS)
    rank = {c: i for i, c in enumerate(_LETTERS)}
    rank["Ġ"] = 0
    pairs = sorted(
        ((a, b) for a in firsts for b in _LETTERS),
        key=lambda ab: (rank[ab[0]] + rank[ab[1]], rank[ab[0]], ab[0] != "Ġ"),
    )
    merges: list[tuple[str, str]] = []
    level = []
    for a, b in pairs:
        merges.append((a, b))
        level.append(a + b)
        if len(merges) >= n:
            return merges
    while True:
        nxt = []
        for i, tok in enumerate(level):
            for c in _LETTERS:
                nxt.append((i + rank[c], tok, c))
        nxt.sort(key=lambda t: t[0])
        level = []
        for _, tok, c in nxt:
            merges.append((tok, c))
            level.append(tok + c)
            if len(merges) >= n:
                return merges


def build_tokenizer(folder: Path, vocab_size: int = 512, chat_template: bool = True) -> None:
    """Write a small deterministic byte-level BPE tokenizer with exactly ``vocab_size`` tokens.

    Ids 0-3 are the special tokens ``<unk>``, ``<s>``, ``</s>``, ``<pad>``; then come the
    byte-level symbols (all 256 if the vocabulary is large enough, else the most useful
    ones, with ``<unk>`` for the rest) and then generated merges of lowercase letters.
    The tokenizer prepends ``<s>`` to encoded text, decodes back to text, has
    bos/eos/pad/unk set and (unless ``chat_template`` is False, as for a base model) a simple
    chat template. It is saved with
    ``save_pretrained`` so ``AutoTokenizer.from_pretrained(folder)`` loads it. No
    training is involved, so it is fast and identical on every call.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < n_special + 4:
        raise ValueError(f"vocab_size must be at least {n_special + 4}, got {vocab_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    alphabet = _byte_alphabet()[: vocab_size - n_special]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = []
    if len(vocab) < vocab_size:
        merges = _merges(vocab_size - len(vocab))
        for a, b in merges:
            vocab[a + b] = len(vocab)
    assert len(vocab) == vocab_size

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_ID)],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if chat_template:
        fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


# --------------------------------------------------------------------------- models


def _num_heads(hidden_size: int) -> int:
    """A sensible attention head count: head_dim 64 for big models, else 4 (or fewer) heads."""
    if hidden_size >= 256 and hidden_size % 64 == 0:
        return hidden_size // 64
    for heads in (4, 2, 1):
        if hidden_size % heads == 0:
            return heads
    return 1


def _make_config(arch: str, hidden_size: int, num_layers: int, vocab_size: int,
                 intermediate_size: int | None, tie_word_embeddings: bool):
    """A transformers config for ``arch`` with the given shape and our tokenizer's special ids."""
    heads = _num_heads(hidden_size)
    if intermediate_size is None and arch != "gpt2":
        # ~8/3 * hidden (SwiGLU convention), rounded up to a multiple of 32.
        intermediate_size = -(-(hidden_size * 8 // 3) // 32) * 32
    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
            vocab_size=vocab_size, max_position_embeddings=2048,
            tie_word_embeddings=tie_word_embeddings, **ids,
        )
    if arch in ("qwen2", "mistral"):
        from transformers import MistralConfig, Qwen2Config

        cls = Qwen2Config if arch == "qwen2" else MistralConfig
        kv_heads = heads // 2 if heads % 2 == 0 else heads  # exercise grouped-query attention
        return cls(
            hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            vocab_size=vocab_size, max_position_embeddings=2048,
            tie_word_embeddings=tie_word_embeddings, **ids,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        # GPT-2's MLP width is fixed at n_inner (default 4 * n_embd).
        return GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=heads, vocab_size=vocab_size,
            n_positions=128, n_inner=intermediate_size,
            tie_word_embeddings=tie_word_embeddings, **ids,
        )
    raise ValueError(f"unsupported arch {arch!r}; expected one of {SUPPORTED_ARCHS}")


@torch.no_grad()
def _perturb_(model: torch.nn.Module, delta_scale: float, seed: int) -> None:
    """In place: ``p += delta_scale * randn_like(p) * p.std()`` for every floating parameter.

    Parameters whose std is 0 (freshly initialised norm weights = 1, biases = 0) use
    ``max(mean |p|, 0.02)`` as scale instead, so fine-tunes differ there too. Shared (tied)
    parameters are perturbed once. A private generator seeded with ``seed`` keeps this
    independent of the global RNG.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # deduplicates tied parameters
        if not p.is_floating_point():
            continue
        src = p.float()
        scale = src.std().item() if src.numel() > 1 else 0.0
        if not scale > 0:
            scale = max(src.abs().mean().item(), 0.02)
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        noise.mul_(delta_scale * scale)
        p.add_(noise.to(p.dtype))
        del noise, src


def _save(model, folder: Path, dtype: torch.dtype, tokenizer_dir: Path, shard_size: str | None) -> None:
    """Save ``model`` (converted to ``dtype``), a generation config and the tokenizer files
    from ``tokenizer_dir`` into ``folder``."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model = model.to(dtype)
    kwargs = {}
    if shard_size is not None:
        kwargs["max_shard_size"] = shard_size
    bars_were_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder), **kwargs)
    finally:
        if not bars_were_disabled:
            hf_logging.enable_progress_bar()
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, folder / file.name)


def _family_paths(root: Path, n_finetuned: int) -> Family:
    return Family(base=root / "base", finetuned=[root / f"ft{i}" for i in range(1, n_finetuned + 1)])


def _complete(path: Path) -> bool:
    """Whether ``path`` looks like a finished checkpoint folder."""
    return (
        (path / "config.json").is_file()
        and (path / "tokenizer.json").is_file()
        and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())
    )


def build_family(root: Path, arch: str = "llama", n_finetuned: int = 2, *, dtype=torch.float32,
                 hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 512,
                 intermediate_size: int | None = None, tie_word_embeddings: bool = True,
                 delta_scale: float = 0.01, seed: int = 0, shard_size: str | None = None,
                 chat_template: bool = True) -> Family:
    """Build (or reuse) a random base model and ``n_finetuned`` perturbed copies under ``root``.

    The base model of architecture ``arch`` (``"llama"``, ``"qwen2"``, ``"mistral"``,
    ``"gpt2"``) is created with ``AutoModelForCausalLM.from_config`` after
    ``torch.manual_seed(seed)``. Fine-tune ``i`` (1-based) is the base with
    ``delta_scale * randn_like(p) * p.std()`` added to every floating parameter, drawn
    from a generator seeded with ``seed + i`` (so ``ft1`` uses ``seed + 1``; see
    :func:`_perturb_` for tensors with zero std). The perturbation is computed in float32
    and each checkpoint is cast to ``dtype`` only before saving.

    Each model is written with ``save_pretrained`` (safetensors; sharded with a
    ``model.safetensors.index.json`` when ``shard_size`` such as ``"50MB"`` is given)
    into ``root/"base"``, ``root/"ft1"``, ... together with ``generation_config.json``
    and a tokenizer from :func:`build_tokenizer`. Tied models do not store
    ``lm_head.weight``. Attention uses ``hidden_size // 64`` heads for hidden sizes
    >= 256 (multiples of 64), otherwise 4; ``intermediate_size`` defaults to ~8/3 of
    ``hidden_size`` (4x for gpt2).

    A JSON stamp of the arguments (``root/"family.json"``) is written last; if it matches
    and all folders are complete, the existing family is returned without rebuilding.
    At most two copies of the model are held in memory (the float32 base and one variant).
    """
    from transformers import AutoModelForCausalLM

    root = Path(root)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {SUPPORTED_ARCHS}")
    if n_finetuned < 0:
        raise ValueError("n_finetuned must be >= 0")
    family = _family_paths(root, n_finetuned)
    stamp = {
        "builder_version": _BUILDER_VERSION,
        "arch": arch, "n_finetuned": n_finetuned, "dtype": str(dtype).removeprefix("torch."),
        "hidden_size": hidden_size, "num_layers": num_layers, "vocab_size": vocab_size,
        "intermediate_size": intermediate_size, "tie_word_embeddings": tie_word_embeddings,
        "delta_scale": delta_scale, "seed": seed, "shard_size": shard_size,
        **({} if chat_template else {"chat_template": False}),  # older stamps stay valid
    }
    stamp_path = root / _STAMP_NAME
    if stamp_path.is_file():
        try:
            old = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            old = None
        if old == stamp and all(_complete(p) for p in [family.base, *family.finetuned]):
            return family

    # (Re)build: drop the stamp first so an interrupted build is never reused, and remove
    # model folders of any previous family in this root (only the names we own).
    root.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    for child in root.iterdir():
        if child.is_dir() and (child.name == "base" or re.fullmatch(r"ft\d+", child.name)):
            shutil.rmtree(child)

    config = _make_config(arch, hidden_size, num_layers, vocab_size, intermediate_size, tie_word_embeddings)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base.eval()

    with tempfile.TemporaryDirectory(dir=root, prefix=".tokenizer-") as tmp:
        tokenizer_dir = Path(tmp)
        build_tokenizer(tokenizer_dir, vocab_size, chat_template)  # once; copied into every checkpoint
        if dtype == torch.float32:
            _save(base, family.base, dtype, tokenizer_dir, shard_size)
        else:
            variant = copy.deepcopy(base)
            _save(variant, family.base, dtype, tokenizer_dir, shard_size)
            del variant
        for i, folder in enumerate(family.finetuned, start=1):
            variant = copy.deepcopy(base)
            _perturb_(variant, delta_scale, seed + i)
            _save(variant, folder, dtype, tokenizer_dir, shard_size)
            del variant
    del base

    stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return family


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors folder."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out
