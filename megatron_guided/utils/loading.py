"""Load user code given by file path: ``path/to/file.py`` modules and ``path/to/file.py:name`` callables.

Used for reward functions (``worker.reward.reward_function``), verifier functions
(``worker.rollout.verifier.function``) and example files that import a sibling file by path.
Every load executes the file afresh under a private module name (registered in ``sys.modules`` so
that dataclasses, pickling and relative lookups inside it work); the file's directory is not
added to ``sys.path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["LoadError", "load_callable", "load_module"]


class LoadError(ValueError):
    """A user file or function cannot be loaded; the message names the config key (`what`)."""


def load_module(path: str | Path, *, what: str, error: type[Exception] = LoadError) -> ModuleType:
    """Execute the Python file at `path` as a fresh module and return it.

    Raises `error` (naming `what`, e.g. the config key) when the file is missing or fails to import.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: no such file {path}")
    resolved = str(path.resolve())
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:12]
    module_name = f"megatron_guided_user_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{what}: cannot import {path} (not a Python file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise error(f"{what}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_callable(spec: str, *, what: str, error: type[Exception] = LoadError) -> Callable[..., Any]:
    """``"path/to/file.py:function_name"`` → that callable.

    `what` is the config key the spec came from (used in error messages); `error` is the exception
    type raised for a malformed spec, a missing file, an import failure or a missing/non-callable
    name (the message then lists the callables the file does define).
    """
    path_str, _, name = str(spec).rpartition(":")
    if not path_str or not name:
        raise error(f"{what}={spec!r}: expected path/to/file.py:function_name")
    path = Path(path_str)
    if not path.is_file():
        raise error(f"{what}={spec!r}: no such file {path}")
    module = load_module(path, what=f"{what}={spec!r}", error=error)
    fn = getattr(module, name, None)
    if not callable(fn):
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise error(f"{path} has no function {name!r}; callable names there: {public}")
    return fn
