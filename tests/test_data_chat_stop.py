"""After a short chat_template fine-tune (packed; full, or LoRA), greedy generation ends at the end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import LORA_LEARNABLE_INIT, build_tiny_llama, build_tiny_tokenizer, tiny_config, write_config, write_jsonl


@pytest.mark.learning
def test_model_learns_to_stop_at_end_of_turn(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.cli import main
    from lmforge.data.formats import NAMED_TEMPLATES

    folder = tmp_path / "model"
    tok = build_tiny_tokenizer(folder)
    tok.add_tokens(["user", "assistant"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = NAMED_TEMPLATES["chatml"].source
    tok.save_pretrained(folder)
    build_tiny_llama(folder, len(tok))
    rows = [
        {"messages": [{"role": "user", "content": f"what is {a} plus {b} ?"}, {"role": "assistant", "content": f"{a} plus {b} equals {a + b}"}]}
        for a in range(1, 5) for b in range(1, 5)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = tiny_config(folder, data, tmp_path / "out", adapter=None, max_steps=40, learning_rate=0.02, sample_packing=True, sequence_len=64)
    config["datasets"] = [{"path": str(data), "type": "chat_template"}]
    config["chat_template"] = "tokenizer_default"
    assert main(["train", str(write_config(tmp_path / "c.yml", config))]) == 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "what is 2 plus 3 ?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=end, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    assert new[-1] == end and len(new) < 20  # stopped by itself, at the end-of-turn token
    words = tok.decode(new[:-1]).split()
    assert len(words) == 5 and words[1::2] == ["plus", "equals"]  # an answer's shape, then the stop (sums are not the point)


# ChatML with {% generation %} around what the assistant writes (its answer and <|im_end|>).
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARITHMETIC_CHATS = [
    {"messages": [{"role": "user", "content": f"what is {a} plus {b} ?"}, {"role": "assistant", "content": f"{a} plus {b} equals {a + b}"}]}
    for a in range(1, 5) for b in range(1, 5)
]


def generate_answer(config: Path, out: Path, question: str) -> tuple[list[int], int]:
    """Greedy answer through lmforge's inference loader and prompt (the config's template, the output's tokenizer)."""
    from lmforge.config import load_config
    from lmforge.data.formats import get_format
    from lmforge.infer.prompts import PromptBuilder
    from lmforge.models.trained import load_for_generation

    cfg = load_config(str(config))
    loaded = load_for_generation(cfg.model.base_model, str(out), dtype=torch.float32)
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt = tokenizer(PromptBuilder.from_config(cfg, tokenizer, model).single(question), add_special_tokens=False).input_ids
    fmt = get_format(cfg.data.datasets[0].type, spec=cfg.data.datasets[0], tokenizer=tokenizer, data=cfg.data)
    end = tokenizer.convert_tokens_to_ids(fmt.stop_tokens[0])
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=end, pad_token_id=0)
    return output[0, len(prompt):].tolist(), end


@pytest.mark.learning
def test_lora_with_a_generation_block_template_learns_to_stop(tmp_path: Path) -> None:
    from lmforge.cli import main

    folder = tmp_path / "model"
    tok = build_tiny_tokenizer(folder)
    tok.add_tokens(["user", "assistant"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(folder)
    # LoRA alone, on a model whose frozen head has a real model's range (LORA_LEARNABLE_INIT, see conftest):
    # over 4 seeds, on AMX and under ATEN_CPU_CAPABILITY=avx2, every run answers "2 plus 3 equals 5" and stops.
    build_tiny_llama(folder, len(tok), **LORA_LEARNABLE_INIT)
    data = write_jsonl(tmp_path / "chat.jsonl", ARITHMETIC_CHATS)
    config = tiny_config(folder, data, tmp_path / "out", max_steps=60, learning_rate=0.02, sample_packing=True, sequence_len=64)
    config["datasets"] = [{"path": str(data), "type": "chat_template"}]
    config["chat_template"] = "jinja"
    config["chat_template_jinja"] = CHATML_GENERATION
    path = write_config(tmp_path / "c.yml", config)
    assert main(["train", str(path)]) == 0

    new, end = generate_answer(path, tmp_path / "out", "what is 2 plus 3 ?")
    assert new[-1] == end and len(new) < 20  # stopped by itself, at the end-of-turn token
    words = AutoTokenizer.from_pretrained(tmp_path / "out").decode(new[:-1]).split()
    assert len(words) == 5 and words[1::2] == ["plus", "equals"]


@pytest.mark.learning
def test_named_template_adds_its_tokens_and_lora_trains_their_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lmforge.cli import main
    from lmforge.data.formats import NAMED_TEMPLATES

    folder = tmp_path / "model"
    tok = build_tiny_tokenizer(folder)  # knows no <|im_start|> / <|im_end|>
    tok.add_tokens(["user", "assistant"])
    tok.save_pretrained(folder)
    build_tiny_llama(folder, len(tok))
    data = write_jsonl(tmp_path / "chat.jsonl", ARITHMETIC_CHATS)
    config = tiny_config(folder, data, tmp_path / "out", max_steps=40, learning_rate=0.02, sample_packing=True, sequence_len=64)
    config["datasets"] = [{"path": str(data), "type": "chat_template"}]
    config["chat_template"] = "chatml"
    path = write_config(tmp_path / "c.yml", config)
    assert main(["train", str(path)]) == 0
    said = capsys.readouterr().out
    assert "added <|im_start|>, <|im_end|> to the tokenizer" in said
    assert "lora_modules_to_save: [embed_tokens, lm_head] is set" in said

    out = tmp_path / "out"
    saved = AutoTokenizer.from_pretrained(out)
    assert len(saved("<|im_start|><|im_end|>", add_special_tokens=False).input_ids) == 2
    assert saved.chat_template == NAMED_TEMPLATES["chatml"].source  # the output renders prompts as training did
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["modules_to_save"]) == {"embed_tokens", "lm_head"}
    new, end = generate_answer(path, out, "what is 2 plus 3 ?")
    assert new[-1] == end and len(new) < 20
