"""Property-based: any dataset rows, in every format and file type, are prepared, skipped and counted, or named.

Rows near each format's layout with random values (wrong types, huge and empty strings, control and
private-use characters, text the tokenizer makes nothing of), random extra and missing fields, and
broken files (invalid UTF-8, lone surrogates, a JSON array cut off, a line that is not an object),
written as JSON, JSONL, CSV, Parquet or text, plain or compressed (.gz, .bz2, .xz, .zst). Each case
runs ``lmforge validate`` and ``lmforge preprocess`` in this process (see fuzz_helpers for the rule
and the budget), with ``skip_bad_rows`` on or off. When preprocess works, every row it read is
accounted for: kept as an example, or counted as bad, skipped by a hook, or left with no trained
token; and for line-based files, the rows read are exactly the file's non-blank lines.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import itertools
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import assert_works_or_one_line, fuzz_settings, run_cli

FORMATS = {
    "alpaca": ("alpaca", ["instruction", "input", "output"]),
    "alpaca_w_system": ("alpaca_w_system", ["system", "instruction", "input", "output"]),
    "user_defined": ({"field_instruction": "q", "field_input": "ctx", "field_output": "a",
                      "format": "Q: {instruction} ({input})\nA: ", "no_input_format": "Q: {instruction}\nA: "}, ["q", "ctx", "a"]),
    "completion": ("completion", ["text"]),
    "input_output": ("input_output", ["segments"]),
    "chat_template": ("chat_template", ["messages"]),
    "sharegpt": ("sharegpt", ["conversations"]),
}
FILE_TYPES = ["jsonl", "json", "csv", "parquet", "text"]
COMPRESSIONS = ["", ".gz", ".bz2", ".xz", ".zst"]

TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from([
        "", " ", "\n", "\r\n", "\t", "\x00", "\x01\x02\x7f", "\u200b", "\ufeff", "\U000f0001", "\U00100005", "🙂" * 40,
        "what is two plus three ?", "two plus three equals five", "the cat " * 400, "x" * 5000, "<s>", "</s>", "<unk>",
        "<|im_start|>", "<|im_end|>", "{instruction}", "{{ messages }}", "{% raw %}", "\\", "\"", "null",
    ]),
)
WRONG = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
VALUE = st.one_of(TEXT, TEXT, TEXT, WRONG)
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "bogus", ""])


@st.composite
def rows_for(draw: st.DrawFn, fmt: str) -> list[dict]:
    """Rows near `fmt`'s layout: mostly its fields with random values, some missing, some extra."""
    _, fields = FORMATS[fmt]
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        row: dict = {}
        for name in fields:
            if draw(st.integers(0, 9)) == 0:
                continue  # the field is missing
            if name == "segments":
                row[name] = draw(st.one_of(WRONG, st.lists(st.fixed_dictionaries(
                    {"text": VALUE}, optional={"label": st.one_of(st.booleans(), WRONG)}), max_size=3)))
            elif name in ("messages", "conversations"):
                role_key, content_key = ("role", "content") if name == "messages" else ("from", "value")
                row[name] = draw(st.one_of(WRONG, st.lists(st.fixed_dictionaries(
                    {role_key: ROLES, content_key: VALUE}), max_size=4)))
            else:
                row[name] = draw(VALUE)
        row.update(draw(st.dictionaries(st.sampled_from(["id", "extra", "output", "text"]), VALUE, max_size=1)))
        rows.append(row)
    return rows


def _cell(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _json_line(row: dict, ascii_only: bool) -> str:
    return json.dumps(row, ensure_ascii=ascii_only)


# A line broken in one way, for JSONL and text files.
BREAKS = st.sampled_from([b"\xff\xfe broken", b"{\"instruction\": \"cut", b"[1, 2]", b"3", b"null", b"   ",
                          b"{\"instruction\": \"\\ud800\", \"output\": \"\\udc00x\", \"text\": \"\\ud83d\"}",
                          b"{\"a\": " * 3000, b"\xc3\x28", b"\xed\xa0\x80"])


def write_data(path: Path, kind: str, rows: list[dict], breaks: list[tuple[int, bytes]], ascii_only: bool,
               cut: int | None) -> Path:
    """`rows` as a `kind` file at `path`; `breaks` insert broken lines, `cut` truncates a JSON array."""
    if kind in ("jsonl", "text"):
        lines = [(_json_line(r, ascii_only) if kind == "jsonl" else " ".join(_cell(v) for v in r.values())).encode("utf-8", "surrogatepass")
                 for r in rows]
        for at, broken in breaks:
            lines.insert(min(at, len(lines)), broken)
        data = b"\n".join(line.replace(b"\n", b" ") if kind == "text" else line for line in lines) + b"\n"
    elif kind == "json":
        data = json.dumps(rows, ensure_ascii=ascii_only, indent=1).encode("utf-8", "surrogatepass")
        if cut is not None:
            data = data[: max(1, min(cut, len(data) - 1))]
        if breaks:
            data = data.replace(b"\n", b"\n" + breaks[0][1] + b"\n", 1) if breaks[0][0] % 2 else data
    elif kind == "csv":
        columns = sorted({k for r in rows for k in r})
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns or ["empty"])
        for r in rows:
            writer.writerow([_cell(r[c]) if c in r else "" for c in columns])
        data = buffer.getvalue().encode("utf-8", "surrogatepass")
        if breaks:
            data += breaks[0][1] + b"\n"
    else:  # parquet: one string column per field (Parquet columns have one type each)
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = sorted({k for r in rows for k in r}) or ["empty"]
        table = pa.table({c: [_cell(r[c]) if c in r else None for r in rows] for c in columns})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        data = sink.getvalue()
        if breaks:
            data = data[: len(data) // 2]  # a Parquet file cut in half
    suffix = path.suffix
    if suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    elif suffix == ".bz2":
        data = bz2.compress(data)
    elif suffix == ".xz":
        data = lzma.compress(data)
    elif suffix == ".zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _non_blank_lines(data: bytes) -> int:
    count = 0
    for raw in data.split(b"\n"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            count += 1
            continue
        count += bool(text.strip())
    return count


@st.composite
def cases(draw: st.DrawFn) -> dict:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    kind = draw(st.sampled_from(["jsonl", "jsonl", "json", "csv", "parquet", "text"] if fmt == "completion" else
                                ["jsonl", "jsonl", "jsonl", "json", "json", "csv", "parquet"]))
    return {
        "format": fmt,
        "kind": kind,
        "compression": draw(st.sampled_from(COMPRESSIONS)),
        "rows": draw(rows_for(fmt)),
        "breaks": draw(st.lists(st.tuples(st.integers(0, 6), BREAKS), max_size=2)) if draw(st.integers(0, 3)) == 0 else [],
        "ascii_only": draw(st.booleans()),
        "cut": draw(st.one_of(st.none(), st.integers(0, 400))) if draw(st.integers(0, 4)) == 0 else None,
        "skip_bad_rows": draw(st.booleans()),
        "train_on_inputs": draw(st.integers(0, 5)) == 0,
        "sequence_len": draw(st.sampled_from([8, 32, 64])),
    }


_counter = itertools.count()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-data")


@fuzz_settings(ci_examples=150)
@given(case=cases())
def test_any_rows_are_prepared_counted_or_named(case: dict, root: Path, tiny_model_dir: Path) -> None:
    folder = root / f"case{next(_counter)}"
    folder.mkdir()
    kind, compression = case["kind"], case["compression"]
    name = f"data.{'txt' if kind == 'text' else kind}{compression}"
    path = write_data(folder / name, kind, case["rows"], case["breaks"], case["ascii_only"], case["cut"])
    dataset_type, _ = FORMATS[case["format"]]
    config = {
        "base_model": str(tiny_model_dir),
        "datasets": [{"path": str(path), "type": dataset_type}],
        "sequence_len": case["sequence_len"],
        "skip_bad_rows": case["skip_bad_rows"],
        "train_on_inputs": case["train_on_inputs"],
        "dataset_prepared_path": str(folder / "prepared"),
        "output_dir": str(folder / "out"),
        "micro_batch_size": 1,
        "max_steps": 1,
    }
    if case["format"] in ("chat_template", "sharegpt"):
        config["chat_template"] = "chatml"
    config_path = folder / "config.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    wheres = (str(folder), "datasets", "sequence_len")

    assert_works_or_one_line(run_cli(["validate", str(config_path)]), wheres)
    result = run_cli(["preprocess", str(config_path)])
    assert_works_or_one_line(result, wheres)
    if result.code != 0:
        return
    [entry] = list((folder / "prepared").iterdir())
    stats = json.loads((entry / "stats.json").read_text())["stats"]
    read = sum(stats["rows"].values())
    examples = sum(len(np.load(entry / f"{split}_offsets.npy", allow_pickle=False)) - 1 for split in ("train", "eval"))
    dropped = stats["bad_rows"] + stats["hook_skipped"] + stats["no_trainable_tokens"]
    assert examples == read - dropped, (stats, examples, result.err)
    if not case["skip_bad_rows"]:
        assert stats["bad_rows"] == 0, stats
    if kind in ("jsonl", "text"):
        from lmforge.data.compressed import read_bytes

        assert read == _non_blank_lines(read_bytes(path)), (stats, result.err)
    elif not case["breaks"] and case["cut"] is None and kind != "json":
        assert read == len(case["rows"]), (stats, result.err)


@st.composite
def files(draw: st.DrawFn) -> dict:
    """A data file as the readers see it, near a format or raw bytes (no tokenizer: many cases, fast)."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    return {
        "format": fmt,
        # CSV and Parquet less often: each goes through datasets (slow), and the end-to-end cases cover them too
        "kind": draw(st.sampled_from(["jsonl", "jsonl", "json", "json", "text", "text", "csv", "parquet"])),
        "compression": draw(st.sampled_from(COMPRESSIONS)),
        "rows": draw(rows_for(fmt)),
        "breaks": draw(st.lists(st.tuples(st.integers(0, 6), BREAKS), max_size=2)),
        "ascii_only": draw(st.booleans()),
        "cut": draw(st.one_of(st.none(), st.integers(0, 400))),
        "raw": draw(st.one_of(st.none(), st.binary(max_size=200))) if draw(st.integers(0, 5)) == 0 else None,
    }


@fuzz_settings(ci_examples=500)
@given(case=files())
def test_any_file_is_read_row_by_row_or_named(case: dict, root: Path) -> None:
    """Every row of any file is read, or is a bad row naming its file:line (counted, never dropped), or the
    file is refused by one LmforgeError naming it; a format's check of a row is a result or an LmforgeError."""
    from lmforge.config.sections import DatasetSpec
    from lmforge.data.check import Unchecked, _row_checker
    from lmforge.data.compressed import read_bytes
    from lmforge.data.formats import SkipRow
    from lmforge.data.sources import read_rows
    from lmforge.errors import LmforgeError

    folder = root / f"file{next(_counter)}"
    folder.mkdir()
    kind, compression = case["kind"], case["compression"]
    path = folder / f"data.{'txt' if kind == 'text' else kind}{compression}"
    if case["raw"] is not None:
        write_data(path, kind, [], [], True, None)
        path.write_bytes(case["raw"])  # any bytes under a data file's name
    else:
        write_data(path, kind, case["rows"], case["breaks"], case["ascii_only"], case["cut"])
    dataset_type, _ = FORMATS[case["format"]]
    spec = DatasetSpec(path=str(path), type=dataset_type)
    try:
        check = _row_checker(spec, "datasets[0]")
    except Unchecked:
        check = None
    read = 0
    try:
        for row in read_rows(str(path)):
            read += 1
            assert row.where.startswith(str(path)), row.where
            if row.error is not None:
                assert row.values is None and "\n" not in row.error
                continue
            assert isinstance(row.values, dict)
            if check is not None:
                try:
                    check(row.values, row.where)
                except (LmforgeError, SkipRow):
                    pass
    except LmforgeError as exc:
        assert exc.where is not None and str(path) in exc.where and exc.fix, exc.format()
        return
    if kind in ("jsonl", "text"):
        assert read == _non_blank_lines(read_bytes(path)), read
