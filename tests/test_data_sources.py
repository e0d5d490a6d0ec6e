"""Sources (json, jsonl, csv, parquet, txt, folders, globs, pkg://, Hub), bad rows, mixing, test_datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import ARITHMETIC, write_jsonl
from lmforge.config.sections import DataSection
from lmforge.data.prepare import prepare
from lmforge.data.sources import read_rows
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _data(**kw) -> DataSection:  # noqa: ANN003
    kw.setdefault("dataset_prepared_path", None)
    return DataSection(**kw)


def test_every_local_file_type_reads_the_same_rows(tmp_path: Path) -> None:
    import pandas as pd

    rows = ARITHMETIC[:5]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        got = [{k: r.values[k] for k in ("instruction", "output")} for r in read_rows(str(tmp_path / name))]
        assert got == [{k: r[k] for k in ("instruction", "output")} for r in rows], name
    (tmp_path / "e.txt").write_text("one two\nthree\n")
    assert [r.values for r in read_rows(str(tmp_path / "e.txt"))] == [{"text": "one two"}, {"text": "three"}]
    assert len(list(read_rows(str(tmp_path)))) == 5 * 4 + 2  # a folder: every data file in it
    assert len(list(read_rows(str(tmp_path / "*.json*")))) == 10  # a glob


def test_object_keyed_by_id_is_one_row_per_record(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps({"x1": {"text": "a"}, "x2": {"text": "b"}}))
    rows = list(read_rows(str(tmp_path / "d.json")))
    assert [r.values for r in rows] == [{"id": "x1", "text": "a"}, {"id": "x2", "text": "b"}]


def test_cut_off_json_array_says_where_and_skip_bad_rows_counts_it(tmp_path: Path, tok) -> None:  # noqa: ANN001
    text = json.dumps([{"text": "one two"}, {"text": "three"}, {"text": "four five"}], indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index("four") + 2])
    with pytest.raises(LmforgeError, match=r"cut\.json:\d+: file is cut off inside record 2 \(it starts at byte \d+"):
        prepare(_data(datasets=[{"path": str(path), "type": "completion"}]), tok, seed=0)
    data = prepare(_data(datasets=[{"path": str(path), "type": "completion"}], skip_bad_rows=True), tok, seed=0)
    assert len(data.train) == 2 and data.stats.bad_rows == 1
    assert "1 bad rows skipped" in data.stats.summary() and "record 2" in data.stats.summary()


def test_skip_bad_rows_counts_malformed_lines_and_missing_fields(tmp_path: Path, tok) -> None:  # noqa: ANN001
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n{"instruction": "c"}\n{"instruction": "d", "output": "e"}\n')
    data = prepare(_data(datasets=[{"path": str(path)}], skip_bad_rows=True), tok, seed=0)
    assert len(data.train) == 2 and data.stats.bad_rows == 2
    assert data.stats.bad_examples[0].startswith(f"{path}:2: malformed JSON")
    assert "'output' is missing" in data.stats.bad_examples[1]


def test_all_rows_bad_is_an_error(tmp_path: Path, tok) -> None:  # noqa: ANN001
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(LmforgeError, match="no usable examples out of 2 rows: 2 bad"):
        prepare(_data(datasets=[{"path": str(path), "type": "completion"}], skip_bad_rows=True), tok, seed=0)


def test_mixed_datasets_shuffled_by_seed_and_test_datasets(tmp_path: Path, tok) -> None:  # noqa: ANN001
    a = write_jsonl(tmp_path / "a.jsonl", ARITHMETIC[:10])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "red blue green"}] * 10)
    t = write_jsonl(tmp_path / "t.jsonl", ARITHMETIC[10:13])
    specs = [{"path": str(a)}, {"path": str(b), "type": "completion"}]
    one = prepare(_data(datasets=specs, test_datasets=[{"path": str(t)}]), tok, seed=1)
    two = prepare(_data(datasets=specs, test_datasets=[{"path": str(t)}]), tok, seed=2)
    assert len(one.train) == 20 and len(one.eval) == 3
    assert [e.input_ids for e in one.train] != [e.input_ids for e in two.train]
    assert sorted(map(tuple, (e.input_ids for e in one.train))) == sorted(map(tuple, (e.input_ids for e in two.train)))
    # not simply concatenated: completion rows are spread through the first half
    assert any(len(e) == 4 for e in one.train[:10])
    with pytest.raises(LmforgeError, match="either val_set_size or test_datasets"):
        prepare(_data(datasets=specs, test_datasets=[{"path": str(t)}], val_set_size=2), tok, seed=1)


def test_hub_dataset_offline_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ConnectionError("Couldn't reach 'nobody/no-such-set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LmforgeError, match="could not load Hub dataset 'nobody/no-such-set'"):
        list(read_rows("nobody/no-such-set"))


def test_pkg_path_reads_a_file_inside_a_package() -> None:
    with pytest.raises(LmforgeError, match="package 'no_such_pkg_xyz' is not installed"):
        list(read_rows("pkg://no_such_pkg_xyz/data.json"))


def _empty_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), path)


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


NO_ROWS = [
    ("header.csv", lambda p: p.write_text("instruction,input,output\n")),
    ("zero.csv", lambda p: p.write_bytes(b"")),
    ("header.csv.gz", lambda p: p.write_bytes(_gzip(b"instruction,input,output\r\n\r\n"))),
    ("zero.jsonl", lambda p: p.write_bytes(b"")),
    ("blank.jsonl.gz", lambda p: p.write_bytes(_gzip(b"\n\n"))),
    ("zero.json", lambda p: p.write_bytes(b"")),
    ("empty-array.json", lambda p: p.write_text("[ ]\n")),
    ("blank.txt", lambda p: p.write_text("\n  \n")),
    ("zero.parquet", lambda p: p.write_bytes(b"")),
    ("no-rows.parquet", _empty_parquet),
]


@pytest.mark.parametrize("name, write", NO_ROWS, ids=[n for n, _ in NO_ROWS])
def test_a_file_with_no_rows_says_so_whatever_its_reader(name: str, write, tmp_path: Path) -> None:  # noqa: ANN001
    """Every reader (csv, jsonl, json, parquet, txt, compressed) ends in the same line for a file with no rows,
    not the reader's own error (a header-only CSV gave 'Instruction "train" corresponds to no data!')."""
    path = tmp_path / name
    write(path)
    with pytest.raises(LmforgeError) as err:
        list(read_rows(str(path)))
    assert err.value.where == str(path) and err.value.message == "the file has no rows", err.value.format()
    assert err.value.fix.startswith("add rows to it") and ("below its header line" in err.value.fix) == (".csv" in name)
