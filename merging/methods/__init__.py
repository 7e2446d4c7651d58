"""Merge methods: every module of this package is imported, and so registered, here.

A new method is one new file in this folder (``register`` a ``MethodSpec`` and its function);
a method kept outside the project is a plugin file named in ``$MERGE_STUDIO_PLUGINS`` and loaded
by ``load_plugins`` (the CLI and the studio call it at start).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

from merging.errors import MergeStudioError
from merging.methods.spec import FAMILIES, REGISTRY, REQUIRED, MergeMethod, MethodSpec, Param, get_method, register

PLUGINS_ENV = "MERGE_STUDIO_PLUGINS"

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def load_plugins(spec: str | None = None) -> list[str]:
    """Import the method plugins named in ``spec`` (default ``$MERGE_STUDIO_PLUGINS``): Python
    files or importable module names, separated by ``os.pathsep``. Each registers its methods
    with ``register`` as the built-in ones do; loading the same file twice is a no-op. Returns
    the module names loaded. A plugin that fails to import raises a ``MergeStudioError``."""
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    loaded = []
    for entry in filter(None, (part.strip() for part in spec.split(os.pathsep))):
        loaded.append(_load_plugin(entry))
    return loaded


def _load_plugin(entry: str) -> str:
    path = Path(entry).expanduser()
    try:
        if entry.endswith(".py"):
            name = "merge_studio_plugin_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            if name not in sys.modules:
                module_spec = importlib.util.spec_from_file_location(name, path)
                if module_spec is None or not path.is_file():
                    raise FileNotFoundError(f"no such file {path}")
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            return name
        importlib.import_module(entry)
        return entry
    except MergeStudioError:
        raise
    except Exception as exc:  # a plugin can fail in any way: say which one and why
        raise MergeStudioError(f"cannot load merge-method plugin {entry!r} (from ${PLUGINS_ENV}): "
                               f"{type(exc).__name__}: {exc}") from None


__all__ = ["FAMILIES", "PLUGINS_ENV", "REGISTRY", "REQUIRED", "MergeMethod", "MethodSpec", "Param", "get_method",
           "load_plugins", "register"]
