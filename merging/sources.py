"""Model references -> local folders of weights, with the safety policy applied.

A reference is a local folder or a Hub repo id (``org/name``, optionally ``@revision``), or
mergekit's LoRA reference ``BASE+ADAPTER``: a base model with a PEFT LoRA adapter (folder or Hub
repo) applied; a PEFT adapter named alone brings its base from its ``adapter_config.json``. Hub
repos are downloaded with ``huggingface_hub.snapshot_download`` restricted to safetensors,
JSON and tokenizer files, so pickles and code never reach the disk (``merging.hub``: whose token,
progress, Stop). ``trust_remote_code`` is
never used anywhere: only the config's declared architecture is read. An adapter's Hub repo
gives only ``adapter_config.json`` and ``adapter_model.safetensors`` (``adapter_model.bin`` only
with ``allow_pickle``); the adapter is applied while reading (``merging.adapters``). In hosted mode local
paths are refused unless they lie inside an explicitly allowed root (the demo cache, the
merge outputs), so users of a public Space cannot read server files through path inputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from merging.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_PICKLE,
    ADAPTER_WEIGHTS,
    adapter_weights,
)
from merging.adapters import read_config as read_adapter_config
from merging.checkpoint import pickle_files, pickle_refusal, safetensors_files
from merging.endpoints import check_endpoint_access, is_endpoint
from merging.errors import SourceError
from merging.hub import Token, check_size, fetch, snapshot_download, split_revision

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "merges.txt", "vocab.txt", "*.jinja"]
PICKLE_PATTERNS = ["pytorch_model*.bin"]
CONFIG_PATTERNS = ["*.json"]


@dataclass(frozen=True)
class SourcePolicy:
    """What references may resolve to. The defaults are the CLI's; a Space uses ``hosted``."""

    allow_pickle: bool = False
    hosted: bool = False
    allowed_roots: tuple[Path, ...] = ()
    max_model_bytes: int | None = None  # Hub models whose weights are larger are refused before any download
    # Whose access Hub calls use (``merging.hub``): None, this machine's token; a visitor's OAuth token;
    # False, anonymous (a hosted visitor not signed in). Never shown, so never in the repr.
    hub_token: Token = field(default=None, repr=False, compare=False)
    endpoints: tuple[str, ...] = ()  # hosted: the endpoint references (merging.endpoints) a visitor may use


@dataclass(frozen=True)
class ResolvedModel:
    """A reference resolved to a checked local folder. With ``adapter`` (a PEFT LoRA adapter's folder),
    the model is ``folder``'s weights with the adapter applied (``merging.adapters.open_reader``);
    ``folder`` and ``config`` are the base's, so config and tokenizer come from the base, as in
    mergekit. Code that loads ``folder`` whole must check ``adapter`` first."""

    ref: str
    folder: Path
    config: dict
    adapter: Path | None = None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return archs[0]

    def whole_folder(self) -> Path:
        """The folder to load as one whole model (chat, evaluation, the sweep): a model given as
        BASE+ADAPTER has none, so it is refused with the way to make one."""
        if self.adapter is not None:
            raise SourceError(
                f"{self.ref!r} is a base model with a LoRA adapter: merges apply the adapter tensor by tensor, "
                "but chat and evaluation load a whole model folder. Write it once with a recipe "
                f"'merge_method: passthrough' and 'models: [{{model: {self.ref}}}]', then use that folder"
            )
        return self.folder


def resolve_model(
    ref: str,
    policy: SourcePolicy = SourcePolicy(),
    download: Callable[[str, str | None, list[str], Token], str] = snapshot_download,
    *,
    weights: bool = True,
) -> ResolvedModel:
    """Turn a reference into a checked local folder, downloading from the Hub when needed.

    With ``weights=False`` only the JSON files (config, tokenizer config) of a Hub repo are
    fetched, so recipes can be checked for compatibility before gigabytes are downloaded.
    ``BASE+ADAPTER`` (mergekit's LoRA reference; a path that exists with a '+' in its name stays a
    path) and a PEFT adapter named alone resolve to the base's folder with ``adapter`` set; the
    adapter's config is checked (``merging.adapters.read_config``) before any weight is fetched.
    """
    if is_endpoint(ref):
        raise SourceError(f"{ref!r} is a model on a serving endpoint: it can answer in the Chat and Evaluate tabs, "
                          "but its weights are not here to merge, inspect or load")
    parts = _lora_parts(ref)
    if parts is None:
        return _resolve_one(ref, policy, download, weights)
    base_ref, adapter_ref = parts
    base = _resolve_one(base_ref, policy, download, weights)
    if base.adapter is not None:
        raise SourceError(f"{ref!r}: {base_ref!r} is itself a LoRA adapter; write BASE+ADAPTER with a full model as BASE")
    return ResolvedModel(ref, base.folder, base.config, _adapter_folder(adapter_ref, ref, policy, download, weights))


def _lora_parts(ref: str) -> tuple[str, str] | None:
    """(base, adapter) of a ``BASE+ADAPTER`` reference, or None for a plain one."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    base, adapter = ref.split("+", 1)
    return base, adapter


def _resolve_one(ref: str, policy: SourcePolicy, download, weights: bool) -> ResolvedModel:
    """A plain reference: a model folder or Hub repo, or a PEFT adapter named alone (it has an
    ``adapter_config.json`` and no ``config.json``), applied to the base it names."""
    local = Path(ref).expanduser()
    if _looks_local(ref) or local.exists():
        folder = _local_folder(ref, local, policy)
    else:
        patterns = None if weights else CONFIG_PATTERNS
        folder = _hub_folder(ref, policy, download, patterns)
    if not (folder / "config.json").is_file() and (folder / ADAPTER_CONFIG).is_file():
        config = read_adapter_config(folder, repr(ref))
        base_ref, revision = config.get("base_model_name_or_path"), config.get("revision")
        if not base_ref or not isinstance(base_ref, str):
            raise SourceError(f"{ref!r} is a LoRA adapter that does not name its base model "
                              "(base_model_name_or_path); write it as BASE+ADAPTER")
        base_ref = f"{base_ref}@{revision}" if isinstance(revision, str) and revision and "@" not in base_ref else base_ref
        base = _resolve_one(base_ref, policy, download, weights)
        if base.adapter is not None:
            raise SourceError(f"{ref!r}: its base {base_ref!r} is itself a LoRA adapter; write BASE+ADAPTER")
        return ResolvedModel(ref, base.folder, base.config, _adapter_folder(ref, ref, policy, download, weights))
    return ResolvedModel(ref, folder, read_config(folder, ref, policy, weights=weights))


def adapter_patterns(policy: SourcePolicy, weights: bool = True) -> list[str]:
    """The files of an adapter's Hub repo that are fetched: its config, and with ``weights`` its
    safetensors weights (the pickle only if ``allow_pickle``)."""
    if not weights:
        return [ADAPTER_CONFIG]
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + ([ADAPTER_PICKLE] if policy.allow_pickle else [])


def _adapter_folder(adapter_ref: str, ref: str, policy: SourcePolicy, download, weights: bool) -> Path:
    """The checked local folder of a PEFT LoRA adapter (``ref`` names the whole reference)."""
    local = Path(adapter_ref).expanduser()
    if _looks_local(adapter_ref) or local.exists():
        folder = _local_folder(adapter_ref, local, policy)
    else:
        repo_id, revision = split_revision(adapter_ref)
        if weights and policy.max_model_bytes is not None:
            check_size(repo_id, revision, policy.max_model_bytes, policy.hub_token)
        folder = _hub_folder(adapter_ref, policy, download, adapter_patterns(policy, weights))
    if not (folder / ADAPTER_CONFIG).is_file():
        raise SourceError(f"{ref!r}: {adapter_ref!r} is not a PEFT adapter (it has no {ADAPTER_CONFIG})")
    read_adapter_config(folder, repr(ref))
    if weights:
        adapter_weights(folder, repr(ref), allow_pickle=policy.allow_pickle)
    return folder


def model_files(ref: str, patterns: list[str], policy: SourcePolicy = SourcePolicy(),
                download: Callable[[str, str | None, list[str], Token], str] = snapshot_download) -> Path:
    """The folder of ``ref`` holding (at least) its files matching ``patterns``: a local folder as
    it is, or for a Hub id only those files, fetched (a model card, a recipe: a few KB)."""
    local = Path(ref).expanduser()
    if _looks_local(ref) or local.exists():
        return _local_folder(ref, local, policy)
    return _hub_folder(ref, policy, download, list(patterns))


def is_hub_ref(ref: str) -> bool:
    """Whether ``ref`` names a Hub repo (``org/name[@rev]``) rather than a local folder, a
    ``BASE+ADAPTER`` pair or an endpoint."""
    return isinstance(ref, str) and not is_endpoint(ref) and not _looks_local(ref) and not Path(ref).expanduser().exists()


def _looks_local(ref: str) -> bool:
    name, _ = split_revision(ref)
    return ref.startswith(("/", ".", "~")) or "\\" in ref or not HUB_ID.match(name)


def allowed_path(path: Path, policy: SourcePolicy) -> bool:
    """Whether ``policy`` lets a local path be read: always outside hosted mode; when hosted,
    only at or below one of its allowed roots (after resolving links and '..')."""
    if not policy.hosted:
        return True
    resolved = path.resolve()
    roots = [root.resolve() for root in policy.allowed_roots]
    return any(resolved == root or root in resolved.parents for root in roots)


def check_local_access(ref: str, policy: SourcePolicy) -> None:
    """Refuse ``ref`` if it is a local path that ``policy`` does not let be read (a Hub id passes).

    For callers that resolve under a wider policy than the user's own, such as the shared chat
    pool (it serves every session's merges), to check the user's policy first.
    """
    if is_endpoint(ref):
        check_endpoint_access(ref, policy.endpoints if policy.hosted else None)
        return
    parts = _lora_parts(ref)
    if parts is not None:
        for part in parts:
            check_local_access(part, policy)
        return
    path = Path(ref).expanduser()
    if (_looks_local(ref) or path.exists()) and not allowed_path(path, policy):
        raise SourceError(
            f"{ref!r}: local paths are disabled on this hosted studio; use a Hub id like 'org/name' "
            "or one of the listed demo models"
        )


def _local_folder(ref: str, path: Path, policy: SourcePolicy) -> Path:
    check_local_access(ref, policy)
    if not path.exists():
        raise SourceError(
            f"model {ref!r} not found: no such folder, and it is not a Hub id of the form 'org/name'"
        )
    if not path.is_dir():
        raise SourceError(f"model {ref!r} is a file; give the folder that holds config.json and the weights")
    return path


def _hub_folder(ref: str, policy: SourcePolicy, download, patterns: list[str] | None = None) -> Path:
    if patterns is None:  # the weights too
        patterns = HUB_PATTERNS + (PICKLE_PATTERNS if policy.allow_pickle else [])
        if policy.max_model_bytes is not None:
            check_size(*split_revision(ref), policy.max_model_bytes, policy.hub_token)
    return Path(fetch(ref, patterns, download, policy.hub_token))


def read_config(folder: Path, ref: str, policy: SourcePolicy = SourcePolicy(), *, weights: bool = True) -> dict:
    """Read config.json and (with ``weights``) check the folder holds weights we may load."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{ref!r} is not a model folder: it has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{ref!r}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{ref!r}: config.json is not a JSON object")
    if weights and not safetensors_files(folder):
        if pickle_files(folder):
            if not policy.allow_pickle:
                raise SourceError(pickle_refusal(repr(ref)))
        else:
            raise SourceError(f"{ref!r} has a config.json but no weights (*.safetensors)")
    return config
