"""The Guide's results on disk, keyed by what they depend on.

A key is the sha256 of a JSON document: what is computed (a cell, or one model's evaluation),
its inputs (recipe, grid) and the demo family's identity (``family_digest``: the shipped adapters'
hashes and the family's build version). Entries are written atomically
(``merging.checkpoint.write_text_atomically``), so a stopped run leaves no half entry and a concurrent reader sees all or nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import demo
from merging.checkpoint import write_text_atomically
from merging.runtime import cache_root

CACHE_ENV = "MERGE_STUDIO_GUIDE_CACHE"  # moves the Guide's results alone (tests start from an empty one)


def guide_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or cache_root() / "guide").expanduser()


def family_digest() -> str:
    """The demo family's identity: its build version and each expert's adapter hash (hashed once
    per adapter file version: a key is computed on every page load)."""
    adapters = [demo.adapter_path(name) for name in demo.EXPERTS]
    return _digest(demo.BUILD_VERSION, tuple((str(a), a.stat().st_size, a.stat().st_mtime_ns) for a in adapters))


@functools.lru_cache(maxsize=8)
def _digest(version: str, adapters: tuple) -> str:
    parts = [version, *(hashlib.sha256(Path(path).read_bytes()).hexdigest() for path, *_ in adapters)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def key_of(kind: str, what: dict) -> str:
    """The key of a ``kind`` of result ('eval', 'cell') that depends on ``what`` and the family."""
    document = json.dumps({"kind": kind, "family": family_digest(), **what}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(document.encode()).hexdigest()[:20]}"


def read(key: str) -> str | None:
    path = guide_root() / f"{key}.json"
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def exists(key: str) -> bool:
    """Whether ``key`` has an entry (without reading it: a page's cheap question)."""
    return (guide_root() / f"{key}.json").is_file()


def write(key: str, text: str) -> None:
    write_text_atomically(guide_root() / f"{key}.json", text)
