"""The base model's row, computed once: cached under a key of the model's content and every setting it depends on.

The key hashes the weights (a .gguf file, or a folder's weight files, by SHA-256; a Hub id by its name),
the tokenizer's vocabulary size, the held-out data file, the tasks, the limit, the prompt format and the
generation settings, and lmforge's evaluation code version (``CACHE_VERSION``): change any of them and the
row is computed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmforge.atomic import write_json
from lmforge.hashing import file_sha256
from lmforge.models.load import cache_root, resolve_model_path

CACHE_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def model_fingerprint(source: str) -> str:
    """SHA-256 over the model's weight files (or its name, for a Hub id that is not on disk)."""
    path = Path(resolve_model_path(source))
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(file_sha256(path).encode())
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + (".json",)):
            digest.update(file.relative_to(path).as_posix().encode())
            digest.update(file_sha256(file).encode())
    else:
        digest.update(f"hub:{source}".encode())
    return digest.hexdigest()


def row_key(fingerprint: str, settings: dict[str, Any]) -> str:
    text = json.dumps({"model": fingerprint, "settings": settings, "version": CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_file(key: str) -> Path:
    return cache_root() / "eval" / f"{key}.json"


def load_row(key: str) -> dict[str, Any] | None:
    path = cache_file(key)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_row(key: str, row: dict[str, Any]) -> Path:
    path = cache_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, row)
    return path
