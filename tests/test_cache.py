"""The prepared-data cache: reused when nothing changed, rebuilt when data, format, tokenizer or lengths change."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import ARITHMETIC, write_jsonl
from lmforge.config.sections import DataSection
from lmforge.data import cache
from lmforge.data.prepare import prepare


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_prepared_data_round_trips_and_is_keyed_by_what_shapes_it(tmp_path: Path, tok) -> None:  # noqa: ANN001
    path = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    root = tmp_path / "prepared"
    data = DataSection(datasets=[{"path": str(path)}], dataset_prepared_path=str(root), val_set_size=3, sequence_len=64)
    first = prepare(data, tok, seed=0)
    assert "prepared data saved to" in first.stats.note
    again = prepare(data, tok, seed=0)
    assert again.stats.note.startswith("reused prepared data")
    assert [(e.input_ids, e.labels) for e in again.train] == [(e.input_ids, e.labels) for e in first.train]
    assert [(e.input_ids, e.labels) for e in again.eval] == [(e.input_ids, e.labels) for e in first.eval]
    assert again.stats.tokens == first.stats.tokens
    assert not list(root.rglob("*.pkl")) and {p.suffix for p in root.rglob("*.*")} == {".npy", ".json"}

    key = cache.cache_key(data, tok, 0)
    assert cache.cache_key(data.model_copy(update={"sequence_len": 32}), tok, 0) != key
    changed = DataSection(**{**data.model_dump(), "datasets": [{"path": str(path), "type": "completion"}]})
    assert cache.cache_key(changed, tok, 0) != key
    other = copy.deepcopy(tok)
    other.add_tokens(["zebra"])
    assert cache.cache_key(data, other, 0) != key
    write_jsonl(path, ARITHMETIC[:-1])  # the file's content, not its name
    assert cache.cache_key(data, tok, 0) != key


def test_train_reuses_without_writing_unless_asked(tmp_path: Path, tok, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    data = DataSection(datasets=[{"path": str(path)}])
    assert prepare(data, tok, seed=0).stats.note == ""  # no dataset_prepared_path: nothing written
    assert not (tmp_path / "last_run_prepared").exists()
    prepare(data, tok, seed=0, save=True)  # what `lmforge preprocess` does
    assert prepare(data, tok, seed=0).stats.note.startswith("reused prepared data last_run_prepared")
