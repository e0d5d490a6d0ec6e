"""Where a dataset's hook function (`type: module.function` or `type: file.py:function`) may come from.

A hook runs the user's Python code, so a config may only name code the user has put beside it
or installed: a ``file.py`` inside the config's folder (the path is read from the current folder,
like every path), a module found in the config's folder, or a module of an installed package.
Anything else is refused when the config is read, naming the key. A config read from a URL has
no folder here: it may name installed packages only. The resolved hook (an absolute
``file.py:function`` for code in the config's folder) is what the data stage imports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmforge.errors import LmforgeError


def is_hook(kind: object) -> bool:
    """True for a `type:` that names a function rather than a built-in format."""
    return isinstance(kind, str) and (".py:" in kind or ("." in kind and not kind.startswith(".") and " " not in kind))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _module_file(folder: Path, module: str) -> Path | None:
    base = folder.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _installed(top: str) -> bool:
    """Whether module `top` is importable without the current folder on the path (installed, or the
    standard library); the current folder is where a downloaded config's stray files would be."""
    here = os.getcwd()
    search = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != here]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        try:
            if find is not None and find(top, search) is not None:
                return True
        except (ImportError, ValueError, TypeError):
            continue
    return False


def resolve_hook(kind: str, config_dir: Path | None, where: str) -> str:
    """The hook `kind` checked against where code may come from; code in the config's folder becomes an
    absolute ``file.py:function``. `config_dir` None: a config read from a URL (installed packages only)."""
    rule = "hooks run only code in the config's folder or in installed packages"
    if ".py:" in kind:
        file, _, name = kind.rpartition(":")
        if config_dir is None:
            raise LmforgeError(f"a config read from a URL cannot run a local file ({file})", where=where,
                               fix=f"{rule}: download the config beside the file, or install the hook as a package")
        path = Path(os.path.expanduser(file))
        if not path.is_file():
            raise LmforgeError(f"hook file does not exist: {file}", where=where,
                               fix="give its path from the current folder (it must be in the config's folder)")
        if not _inside(path, config_dir):
            raise LmforgeError(f"hook file {file} is outside the config's folder {config_dir}", where=where,
                               fix=f"{rule}: move the file beside the config")
        return f"{path.resolve()}:{name}"
    module, _, name = kind.rpartition(".")
    if config_dir is not None and (local := _module_file(config_dir, module)) is not None:
        return f"{local.resolve()}:{name}"
    if not _installed(module.split(".")[0]):
        raise LmforgeError(f"cannot find module '{module}' for type {kind}", where=where,
                           fix=f"{rule}: put {module.replace('.', '/')}.py beside the config, install it, "
                               "or write type: path/to/file.py:function")
    return kind
