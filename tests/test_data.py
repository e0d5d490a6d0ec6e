"""Formats, tokenization and splitting, checked token by token on the tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import write_jsonl
from lmforge.config.sections import DataSection, UserDefinedFormat
from lmforge.data.batching import batch_order, collate
from lmforge.data.formats import ALPACA_NO_INPUT, get_format
from lmforge.data.prepare import IGNORE_INDEX, PrepareStats, prepare, split_eval, tokenize_rows
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ids(tok, text: str) -> list[int]:  # noqa: ANN001
    return tok(text, add_special_tokens=False).input_ids


def test_user_defined_golden_tokenization(tok) -> None:  # noqa: ANN001
    fmt = get_format(UserDefinedFormat(field_instruction="question", field_output="answer", format="question : {instruction} answer :"))
    segments = fmt.segments({"question": "what is two plus two ?", "answer": "four"}, "f:1")
    stats = PrepareStats()
    (example,) = tokenize_rows([segments], tok, sequence_len=64, train_on_inputs=False, stats=stats)
    prompt = ids(tok, "question : what is two plus two ? answer :")
    response = ids(tok, "four")
    assert example.input_ids == prompt + response + [tok.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response + [tok.eos_token_id]
    assert stats.label_tokens == len(response) + 1


def test_train_on_inputs_labels_everything(tok) -> None:  # noqa: ANN001
    fmt = get_format("alpaca")
    segments = fmt.segments({"instruction": "add one", "output": "two"}, "f:1")
    (example,) = tokenize_rows([segments], tok, 512, train_on_inputs=True, stats=PrepareStats())
    assert example.labels == example.input_ids


def test_alpaca_prompt_with_and_without_input() -> None:
    fmt = get_format("alpaca")
    no_input = fmt.segments({"instruction": "name a cat", "output": "tom"}, "f:1")
    with_input = fmt.segments({"instruction": "add", "input": "one two", "output": "three"}, "f:2")
    assert no_input[0].text == ALPACA_NO_INPUT.format(instruction="name a cat")
    assert "### Input:\none two\n\n### Response:\n" in with_input[0].text
    assert [s.train for s in with_input] == [False, True]


def test_truncation_is_counted_and_promptonly_rows_reported(tok) -> None:  # noqa: ANN001
    fmt = get_format(UserDefinedFormat(field_instruction="q", field_output="a", format="{instruction}"))
    rows = [fmt.segments({"q": "one two three", "a": "four five six seven"}, "f:1"), fmt.segments({"q": "one " * 20, "a": "two"}, "f:2")]
    stats = PrepareStats()
    examples = tokenize_rows(rows, tok, sequence_len=5, train_on_inputs=False, stats=stats)
    assert [len(e) for e in examples] == [5]
    assert stats.truncated == 2 and stats.no_trainable_tokens == 1


def test_missing_field_names_file_line_field_and_columns(tmp_path: Path, tok) -> None:  # noqa: ANN001
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}])
    data = DataSection(datasets=[{"path": str(path), "type": "alpaca"}])
    with pytest.raises(LmforgeError) as err:
        prepare(data, tok, seed=0)
    text = str(err.value)
    assert f"{path}:2" in text and "'output' is missing" in text and "answer, instruction" in text


def test_malformed_json_line_named(tmp_path: Path, tok) -> None:  # noqa: ANN001
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(LmforgeError, match=f"{path}:2: malformed JSON"):
        prepare(DataSection(datasets=[{"path": str(path)}]), tok, seed=0)


def test_empty_dataset_is_an_error(tmp_path: Path, tok) -> None:  # noqa: ANN001
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(LmforgeError, match=f"{path}: the file has no rows"):
        prepare(DataSection(datasets=[{"path": str(path)}]), tok, seed=0)


def test_unknown_type_lists_types(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="unknown dataset type 'alpacca'.*alpaca"):
        get_format("alpacca")


def test_val_split_is_seeded_and_disjoint() -> None:
    examples = [type("E", (), {"i": i})() for i in range(100)]
    train_a, eval_a = split_eval(examples, 0.1, seed=1)
    train_b, eval_b = split_eval(examples, 0.1, seed=1)
    _, eval_c = split_eval(examples, 0.1, seed=2)
    assert [e.i for e in eval_a] == [e.i for e in eval_b] != [e.i for e in eval_c]
    assert len(eval_a) == 10 and len(train_a) == 90
    assert not {e.i for e in eval_a} & {e.i for e in train_a}
    assert len(split_eval(examples, 7, seed=1)[1]) == 7


def test_collate_pads_with_ignored_labels_and_no_attention() -> None:
    from lmforge.data.prepare import Example

    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_grouping_covers_every_example_once_and_cuts_padding() -> None:
    import random

    lengths = [random.Random(i).randint(10, 500) for i in range(1000)]
    grouped = batch_order(lengths, 4, seed=0, epoch=0, group_by_length=True)
    plain = batch_order(lengths, 4, seed=0, epoch=0, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(1000))

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5
    assert batch_order(lengths, 4, 0, 1, True) != grouped  # a new order each epoch
