"""Read dataset rows from local files or the Hugging Face Hub, each row tagged with where it came from.

The tag (``file:line`` or ``file:record N``) is what lets a bad row be named precisely later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

FILE_TYPES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Row:
    values: dict[str, Any]
    where: str  # "file:line" or "dataset[split] row N"


def _file_type(path: Path, ds_type: str | None) -> str:
    if ds_type:
        return ds_type
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise LmforgeError(
            f"cannot tell the file type of '{path.name}'",
            where=str(path),
            fix=f"set ds_type to one of {', '.join(sorted(set(FILE_TYPES.values())))}",
        )
    return kind


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LmforgeError(f"malformed JSON line: {exc.msg} at column {exc.colno}", where=f"{path}:{number}") from exc
            if not isinstance(value, dict):
                raise LmforgeError("each line must be a JSON object", where=f"{path}:{number}")
            yield Row(value, f"{path}:{number}")


def _read_json(path: Path) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line, named .json
            yield from _read_jsonl(path)
            return
        raise LmforgeError(f"malformed JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from exc
    records = value if isinstance(value, list) else [value]
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise LmforgeError(f"record {index} is not a JSON object", where=str(path))
        yield Row(record, f"{path}:record {index}")


def _read_with_datasets(kind: str, files: list[str]) -> Iterator[Row]:
    from datasets import load_dataset

    loaded = load_dataset(kind, data_files=files, split="train")
    for index, record in enumerate(loaded):
        yield Row(dict(record), f"{files[0] if len(files) == 1 else files}:row {index + 1}")


def read_local(path: Path, ds_type: str | None = None) -> Iterator[Row]:
    """Rows of one local file."""
    kind = _file_type(path, ds_type)
    if kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "json":
        yield from _read_json(path)
    elif kind == "text":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                yield Row({"text": line.rstrip("\n")}, f"{path}:{number}")
    else:
        yield from _read_with_datasets(kind, [str(path)])


def read_hub(path: str, name: str | None, split: str, data_files: Any) -> Iterator[Row]:
    """Rows of a Hugging Face Hub dataset; offline or unknown ids get one clear error."""
    from datasets import load_dataset

    try:
        loaded = load_dataset(path, name=name, split=split, data_files=data_files)
    except Exception as exc:  # datasets raises many types for network and lookup failures
        raise LmforgeError(
            f"could not load Hub dataset '{path}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            where=f"datasets: path: {path}",
            fix="check the id, or download it elsewhere and point path at the local files",
        ) from exc
    for index, record in enumerate(loaded):
        yield Row(dict(record), f"{path}[{split}] row {index}")


def read_rows(path: str, ds_type: str | None = None, data_files: Any = None, split: str = "train", name: str | None = None) -> Iterator[Row]:
    """All rows of a dataset entry: a file, a folder of files, or a Hub id."""
    local = Path(os.path.expanduser(path))
    if local.is_file():
        yield from read_local(local, ds_type)
    elif local.is_dir():
        wanted = [data_files] if isinstance(data_files, str) else data_files
        files = [local / f for f in wanted] if wanted else sorted(
            p for p in local.iterdir() if p.suffix.lower() in FILE_TYPES and p.is_file()
        )
        if not files:
            raise LmforgeError("folder holds no data files", where=str(local), fix="set data_files or ds_type")
        for file in files:
            if not file.is_file():
                raise LmforgeError("data file does not exist", where=str(file), fix="fix data_files")
            yield from read_local(file, ds_type)
    else:
        yield from read_hub(path, name, split, data_files)
