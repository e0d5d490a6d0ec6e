"""The prepared-dataset cache: tokenized data stored once as numpy files, keyed by everything that shapes it.

The key hashes the data files' bytes (or the Hub id, config, split and files), the tokenizer
(its vocabulary and merges, special tokens, chat template), each entry's format and keys, the
data keys (sequence_len, train_on_inputs, chat_template, splits, ...) and the seed. Change any of
them and a new entry is made; the old one stays until deleted. Storage is plain ``.npy`` arrays
(loaded with ``allow_pickle=False``) plus a JSON file: no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_dir
from lmforge.hashing import file_sha256
from lmforge.config.sections import DataSection, DatasetSpec, UserDefinedFormat
from lmforge.data.examples import Example, PreparedData, PrepareStats
from lmforge.data.sources import local_files

DEFAULT_PREPARED_PATH = "last_run_prepared"
FORMAT_VERSION = 2  # bump when the meaning of stored ids or labels changes (2: templates rendered by transformers, tokens trained by overlap)


def _hook_digest(kind: Any) -> str:
    if not isinstance(kind, str) or "." not in kind:
        return ""
    if ".py:" in kind:
        path = Path(kind.rpartition(":")[0]).expanduser()
        return file_sha256(path) if path.is_file() else ""
    try:
        spec = importlib.util.find_spec(kind.rpartition(".")[0])
    except (ImportError, ValueError):
        return ""
    return file_sha256(Path(spec.origin)) if spec and spec.origin and os.path.isfile(spec.origin) else ""


def _spec_fingerprint(spec: DatasetSpec) -> dict[str, Any]:
    files = local_files(spec.path, spec.ds_type, spec.data_files)
    content = [file_sha256(f) for f in files] if files is not None else None
    kind = spec.type.model_dump() if isinstance(spec.type, UserDefinedFormat) else spec.type
    return {"spec": spec.model_dump(mode="json", exclude={"path"}), "content": content or spec.path, "type": kind, "hook": _hook_digest(spec.type),
            "template_file": _template_file_digest(spec.chat_template_jinja)}


def _template_file_digest(jinja: str | None) -> str:
    """chat_template_jinja may name a .jinja file: its bytes shape the data, not its name."""
    path = Path(jinja).expanduser() if jinja and "{" not in jinja else None
    return file_sha256(path) if path is not None and path.is_file() else ""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    template = getattr(tokenizer, "chat_template", None)
    extras = [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, json.dumps(template, sort_keys=True), len(tokenizer)]
    digest.update(json.dumps(extras, default=str).encode())
    return digest.hexdigest()


def cache_key(data: DataSection, tokenizer: Any, seed: int) -> str:
    parts = {
        "version": FORMAT_VERSION,
        "datasets": [_spec_fingerprint(s) for s in data.datasets],
        "test_datasets": [_spec_fingerprint(s) for s in data.test_datasets or []],
        "data": data.model_dump(mode="json", include={"sequence_len", "train_on_inputs", "chat_template", "chat_template_jinja", "chat_template_kwargs", "eot_tokens", "val_set_size", "shuffle_merged_datasets", "skip_bad_rows", "min_sample_len", "dataset_exact_deduplication"}),
        "template_file": _template_file_digest(data.chat_template_jinja),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_split(folder: Path, name: str, examples: list[Example]) -> None:
    lengths = np.fromiter((len(e) for e in examples), dtype=np.int64, count=len(examples))
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32, count=int(offsets[-1]))
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int32, count=int(offsets[-1]))
    np.save(folder / f"{name}_input_ids.npy", ids)
    np.save(folder / f"{name}_labels.npy", labels)
    np.save(folder / f"{name}_offsets.npy", offsets)


def _read_split(folder: Path, name: str) -> list[Example]:
    ids = np.load(folder / f"{name}_input_ids.npy", allow_pickle=False).tolist()
    labels = np.load(folder / f"{name}_labels.npy", allow_pickle=False).tolist()
    offsets = np.load(folder / f"{name}_offsets.npy", allow_pickle=False).tolist()
    return [Example(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


SPLIT_FILES = tuple(f"{split}_{part}.npy" for split in ("train", "eval") for part in ("input_ids", "labels", "offsets"))


class DamagedEntry(Exception):
    """A cache entry that cannot be trusted (cut off, altered, or written by an older lmforge)."""


def save(root: str | os.PathLike, key: str, prepared: PreparedData) -> Path:
    """Write an entry atomically (a temporary folder renamed into place), with each file's size and SHA-256."""

    def write(tmp: Path) -> None:
        _write_split(tmp, "train", prepared.train)
        _write_split(tmp, "eval", prepared.eval)
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)} for name in SPLIT_FILES}
        (tmp / "stats.json").write_text(json.dumps({"key": key, "stats": prepared.stats.to_json(), "files": files}, indent=1),
                                        encoding="utf-8")

    return atomic_dir(Path(root) / key, write)


def _verified(folder: Path, key: str) -> dict[str, Any]:
    """stats.json of an entry whose every file matches the size and checksum recorded when it was saved."""
    try:
        meta = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        files = meta["files"]
        stored_key = meta["key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedEntry(f"stats.json is unreadable or from an older lmforge ({type(exc).__name__})") from exc
    if stored_key != key:
        raise DamagedEntry(f"stats.json belongs to entry {stored_key}")
    for name in SPLIT_FILES:
        path, expected = folder / name, files.get(name) if isinstance(files, dict) else None
        if not isinstance(expected, dict) or not path.is_file():
            raise DamagedEntry(f"{name} is missing")
        if path.stat().st_size != expected.get("size") or file_sha256(path) != expected.get("sha256"):
            raise DamagedEntry(f"{name} is damaged (size or checksum differs from stats.json)")
    return meta


def load(root: str | os.PathLike, key: str) -> PreparedData | None:
    """The entry `key`, or None when there is none. An entry that does not verify raises DamagedEntry
    (the caller rebuilds it): a prepared-data cache is never trusted blindly."""
    folder = Path(root) / key
    if not folder.is_dir():
        return None
    meta = _verified(folder, key)
    try:
        return PreparedData(_read_split(folder, "train"), _read_split(folder, "eval"), PrepareStats.from_json(meta["stats"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedEntry(f"cannot be read ({type(exc).__name__}: {exc})") from exc
