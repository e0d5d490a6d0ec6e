"""Every `chat_template:` name axolotl accepts, and axolotl's `type: BASE:STYLE` formats.

Named templates: on 20 real ShareGPT conversations, the ids lmforge trains on equal
``apply_chat_template``'s with the family's published template (TRL's independent copy where
tests/fixtures/chat_templates has one, else the shipped .jinja), and the trained tokens are each
answer and its end of turn (or ``return_assistant_tokens_mask`` for templates with
``{% generation %}`` blocks). No family tokenizer can be downloaded here, so the tokenizer is a
byte-level BPE trained on the conversations that knows every template's marker tokens.

A name or a type lmforge does not have is refused by `validate`, naming the line, not minutes
later when the data is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.config.formats import CHAT_TEMPLATE_NAMES, LEGACY_BASES, LEGACY_STYLES
from lmforge.config.sections import DataSection, DatasetSpec
from lmforge.data.formats import get_format
from lmforge.data.formats.templates import FILE_TEMPLATES, NAMED_TEMPLATES, TEMPLATE_FOLDER
from lmforge.data.prepare import IGNORE_INDEX as X, PrepareStats, tokenize_rows
from test_chat_templates import FIXTURES, conversations  # noqa: F401  (the 20 ShareGPT conversations)

# The family's published template from an independent copy (TRL's), where the shipped one should render the same.
PUBLISHED = {
    "qwen_25": "qwen2_5.jinja", "gemma3": "gemma3.jinja", "gemma3n": "gemma3.jinja", "qwen3": "qwen3.jinja",
    "qwen3_5": "qwen3.jinja", "mistral_v2v3": "mistral.jinja", "llama3_2_vision": "llama3_2.jinja",
}
# What a template writes around the answer itself, trained with it (the model must write it too).
ANSWER_WRAPPERS = ("<think>", "</think>", "<|START_RESPONSE|>", "<|END_RESPONSE|>")
SPECIAL = sorted({"<s>", "</s>", "<|startoftext|>", "<|system|>", "<|user|>", "<|assistant|>"}
                 | {m for markers, _ in FILE_TEMPLATES.values() for m in markers}
                 | {m for t in NAMED_TEMPLATES.values() for m in t.markers})


@pytest.fixture(scope="module")
def tokenizer_dir(conversations: list, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    from conftest import train_byte_level_bpe

    return train_byte_level_bpe((t["value"] for turns in conversations for t in turns), SPECIAL,
                                tmp_path_factory.mktemp("bpe-named"), bos_token="<s>", eos_token="</s>")


def runs_of(labels: list[int], ids: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    current: list[int] = []
    for token, label in zip(ids, labels):
        if label != X:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_named_template_ids_equal_the_published_template_and_answers_are_trained(
    name: str, conversations: list, tokenizer_dir: Path  # noqa: F811
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fmt = get_format("chat_template", spec=DatasetSpec(path="x", type="chat_template"), tokenizer=tokenizer,
                     data=DataSection(chat_template=name))
    published = (FIXTURES / PUBLISHED[name]).read_text(encoding="utf-8") if name in PUBLISHED else NAMED_TEMPLATES[name].source
    ends = [e for e in fmt.end_of_turn if e]
    for number, turns in enumerate(conversations):
        row = {"conversations": ([{"from": "system", "value": "Answer briefly."}] if number % 2 else []) + turns}
        where = f"sharegpt:{number}"
        messages = fmt.messages(row, where)
        (example,) = tokenize_rows([fmt.segments(row, where)], tokenizer, 100_000, False, PrepareStats(), joint=True)
        assert example.input_ids == tokenizer.apply_chat_template(messages, chat_template=published, return_dict=False), where
        if fmt.generation:
            reference = tokenizer.apply_chat_template(messages, chat_template=published, return_dict=True,
                                                      return_assistant_tokens_mask=True)
            assert [label != X for label in example.labels] == [bool(m) for m in reference["assistant_masks"]], where
            continue
        answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
        runs = [tokenizer.decode(run) for run in runs_of(example.labels, example.input_ids)]
        assert len(runs) == len(answers), where
        for text, answer in zip(runs, answers):
            rest = text.replace(answer, "", 1)
            assert answer in text and not any(t in rest for t in ("<|user|>", "[INST]", "USER:")), (where, text[:200])
            for end in ends:  # nothing but the reasoning block, whitespace and the end-of-turn token is trained besides
                rest = rest.replace(end, "")
            for wrapper in ANSWER_WRAPPERS:
                rest = rest.replace(wrapper, "")
            assert not rest.strip(), (where, rest[:200])


def test_every_name_has_its_template_and_the_config_list_matches() -> None:
    assert set(CHAT_TEMPLATE_NAMES) == set(NAMED_TEMPLATES)
    assert {p.stem for p in TEMPLATE_FOLDER.glob("*.jinja")} == set(FILE_TEMPLATES)


def validate(tmp_path: Path, **keys: Any) -> tuple[int, str]:
    import contextlib
    import io

    from lmforge import cli

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b", "question": "q", "category": "c", "answer": "x", '
                    '"INSTRUCTION": "i", "RESPONSE": "r"}\n', encoding="utf-8")
    config = {"base_model": str(tmp_path), "datasets": [{"path": str(data), "type": "alpaca"}], **keys}
    if "type" in keys:
        config["datasets"][0]["type"] = config.pop("type")
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["validate", str(path)])
    return code, err.getvalue()


@pytest.mark.parametrize("name", ["gemma3", "qwen3_5", "llama4", "falcon_h1", "tokenizer_default_fallback_qwen_25"])
def test_validate_accepts_axolotls_template_names(name: str, tmp_path: Path) -> None:
    assert validate(tmp_path, chat_template=name)[0] == 0


def test_validate_refuses_an_unknown_template_name_and_type_naming_the_line(tmp_path: Path) -> None:
    code, err = validate(tmp_path, chat_template="qwen9")
    assert code != 0 and "c.yml:" in err and "unknown chat_template 'qwen9'" in err and "gemma3" in err
    code, err = validate(tmp_path, chat_template="tokenizer_default_fallback_nope")
    assert code != 0 and "unknown chat_template 'nope'" in err
    code, err = validate(tmp_path, type="alpaca:shouty")
    assert code != 0 and "unknown prompt style 'shouty'" in err and "c.yml:" in err
    code, err = validate(tmp_path, type="instruct_v9")
    assert code != 0 and "unknown dataset type 'instruct_v9'" in err
    for kind in ("alpaca:chat", "alpaca:phi", "jeopardy", "oasst:chatml", "alpaca_chat"):
        assert validate(tmp_path, type=kind)[0] == 0, kind


# axolotl's prompters.py, written out: (type, row) → (prompt, trained answer).
ALPACA_IN = ("Below is an instruction that describes a task, paired with an input that provides further context. "
             "Write a response that appropriately completes the request.")
ALPACA_NO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ROW = {"instruction": "Add 2 and 3.", "input": "numbers", "output": "5"}
EXPECTED = {
    "alpaca:chat": (f"SYSTEM: {ALPACA_IN}\nUSER: Add 2 and 3.\nnumbers\nASSISTANT:", "5"),
    "alpaca:phi": (f"<|system|>\n{ALPACA_IN}<|end|>\n<|user|>\nAdd 2 and 3.<|end|>numbers<|assistant|>", "5"),
    "alpaca:chatml": (f"<|im_start|>system\n{ALPACA_IN}<|im_end|>\n<|im_start|>user\nAdd 2 and 3.\nnumbers<|im_end|>\n"
                      "<|im_start|>assistant\n", "5"),
    "alpaca:instruct": (f"{ALPACA_IN}\n\n### Instruction:\nAdd 2 and 3.\n\n### Input:\nnumbers\n\n### Response:\n", "5"),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_legacy_styles_write_axolotls_prompt_and_train_only_the_answer(kind: str) -> None:
    segments = get_format(kind).segments(ROW, "row 0")
    assert [(s.text, s.train) for s in segments] == [(EXPECTED[kind][0], False), (EXPECTED[kind][1], True)]


def test_legacy_bases_read_their_own_columns() -> None:
    no_input = get_format("alpaca:phi").segments({"instruction": "Hi", "output": "Yo"}, "r")
    assert no_input[0].text == f"<|system|>\n{ALPACA_NO}<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    jeopardy = get_format("jeopardy").segments({"question": "This planet is red", "category": "SPACE", "answer": "Mars"}, "r")
    assert jeopardy[0].text.endswith("### Instruction:\nThis planet is red\n\n### Input:\nSPACE\n\n### Response:\n")
    assert jeopardy[1].text == "what is Mars"
    choice = get_format("concisechoice:chat").segments({"question": "2+2?", "choices": ["3", "4"], "solution": "4"}, "r")
    assert choice[0].text == ("Choose the answer that best answers the question. Be concise in your response.\n\n"
                              'USER: 2+2?\n- "3"\n- "4"\nASSISTANT:')
    assert get_format("oasst:chat").segments({"INSTRUCTION": "Q", "RESPONSE": "A"}, "r")[1].text == "A"
    assert set(LEGACY_BASES) >= {"alpaca", "jeopardy"} and set(LEGACY_STYLES) == {"instruct", "chat", "chatml", "phi"}
