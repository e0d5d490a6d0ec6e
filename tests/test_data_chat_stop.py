"""After a short chat_template fine-tune (packed), greedy generation ends at the end-of-turn token."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import build_tiny_llama, build_tiny_tokenizer, tiny_config, write_config, write_jsonl


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
