"""Sizes and counts as people write and read them: '2GB' in, '538.1 MB' and '134.5M' out."""

from __future__ import annotations

from merging.errors import MergeStudioError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "size") -> int:
    """'2GB' -> 2_000_000_000; '500MB', '1.5GiB' and plain bytes too. ``what`` names the setting
    in the error a bad or non-positive size raises."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        value = str(text).strip().upper()
        number = value.rstrip("KMGTIB")
        try:
            size = int(float(number) * _UNITS[value[len(number):]])
        except (ValueError, KeyError):
            size = 0
    if size <= 0:
        raise MergeStudioError(f"{what} {text!r} is not a positive size; use e.g. 2GB or 500MB")
    return size


def format_bytes(count: int | float | None) -> str:
    """'538.1 MB': decimal units, the inverse of ``parse_size`` to a tenth of the unit; '?' for None."""
    if count is None:
        return "?"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def format_count(count: int | None) -> str:
    """'134.5M', '2.4K', '7'; '?' for None."""
    if count is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
