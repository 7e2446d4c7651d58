"""The Guide's results on disk, keyed by what they depend on.

A key is the sha256 of a JSON document: what is computed (a cell, or one model's evaluation),
its inputs (recipe, grid) and the demo family's identity (``family_digest``: the shipped adapters'
hashes and the family's build version). Entries are written atomically (a temporary file renamed
into place), so a stopped run leaves no half entry and a concurrent reader sees all or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import demo
from merging.runtime import cache_root

CACHE_ENV = "MERGE_STUDIO_GUIDE_CACHE"  # moves the Guide's results alone (tests start from an empty one)


def guide_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or cache_root() / "guide").expanduser()


def family_digest() -> str:
    """The demo family's identity: its build version and each expert's adapter hash."""
    parts = [demo.BUILD_VERSION, *(hashlib.sha256(demo.adapter_path(n).read_bytes()).hexdigest() for n in demo.EXPERTS)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def key_of(kind: str, what: dict) -> str:
    document = json.dumps({"kind": kind, "family": family_digest(), **what}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(document.encode()).hexdigest()[:20]}"


def read(key: str) -> str | None:
    path = guide_root() / f"{key}.json"
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def write(key: str, text: str) -> None:
    write_atomically(guide_root() / f"{key}.json", text)


def write_atomically(path: Path, text: str) -> Path:
    """``text`` into ``path`` through a temporary sibling renamed into place: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
