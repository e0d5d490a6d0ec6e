"""Random-init models for pretraining: presets, size overrides, errors, FLOPs."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models.build import PRESETS, build_config, build_model, count_parameters, flops_per_token


def test_llama_tiny_is_a_causal_lm_with_our_ids() -> None:
    model = build_model(build_config("llama", 500, "tiny", bos_token_id=2, eos_token_id=3, pad_token_id=0))
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (500, 64, 2, 4)
    assert cfg.num_key_value_heads == 4  # not Llama's default of heads (32) or 8
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 3, 0)
    out = model(input_ids=torch.randint(0, 500, (2, 12)), labels=torch.randint(0, 500, (2, 12)))
    assert out.logits.shape == (2, 12, 500) and torch.isfinite(out.loss)


def test_gpt2_overrides_map_to_native_names() -> None:
    cfg = build_config("gpt2", 300, "tiny", {"num_layers": 3, "hidden_size": 96, "num_heads": 6,
                                              "intermediate_size": 200, "max_position_embeddings": 128})
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.n_positions) == (3, 96, 6, 200, 128)
    assert cfg.bos_token_id is None  # gpt2's default 50256 would be outside a 300-token vocabulary
    # Native field names are accepted too.
    assert build_config("gpt2", 300, "tiny", {"n_layer": 5}).n_layer == 5


def test_bert_mlm_and_config_class_names() -> None:
    model = build_model(build_config("bert", 400, "tiny", objective="mlm", pad_token_id=0, mask_token_id=4), "mlm")
    assert type(model).__name__ == "BertForMaskedLM" and model.config.mask_token_id == 4
    assert build_config("MistralConfig", 300, "tiny").model_type == "mistral"
    assert build_config("Qwen2ForCausalLM", 300, "tiny").model_type == "qwen2"


def test_seed_gives_same_weights_and_leaves_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(build_config("gpt2", 300, "tiny"), seed=5)
    after = torch.rand(3)
    b = build_model(build_config("gpt2", 300, "tiny"), seed=5)
    c = build_model(build_config("gpt2", 300, "tiny"), seed=6)
    assert torch.equal(expected, after)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("nope", 100), "llama"),  # unknown architecture: lists valid ones
        (("llama", 100, "tiny", {"n_embd": 8}), "hidden_size"),  # a gpt2 name on llama: lists fields
        (("llama", 100, "huge"), "125M"),  # unknown preset
        (("llama", 100, "tiny", None, "mlm"), "bert"),  # llama has no MLM head
        (("bert", 100, "tiny", None, "clm"), "llama"),  # bert is an encoder
        (("llama", 100, "tiny", {"num_heads": 5}), "divisible"),
        (("llama", 100, "tiny", None, "clm"), None),  # control: valid
    ],
)
def test_errors_name_the_valid_choices(args: tuple, needle: str | None) -> None:
    if needle is None:
        build_config(*args)
        return
    with pytest.raises(LmforgeError) as err:
        build_config(*args)
    assert needle in str(err.value)


def test_bos_outside_vocab_is_rejected() -> None:
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        build_config("llama", 100, "tiny", bos_token_id=100)


def test_parameter_counts_and_flops() -> None:
    model = build_model(build_config("gpt2", 1000, "tiny"))
    cfg = model.config
    d, layers, pos = cfg.n_embd, cfg.n_layer, cfg.n_positions
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    # gpt2 ties the head to the token table: non-embedding = total - token table - position table.
    assert count_parameters(model, exclude_embeddings=True) == total - 1000 * d - pos * d
    # FLOPs: 6·N with N = all but the position table (the tied table is the head matmul) + attention.
    seq = 128
    assert flops_per_token(cfg, seq) == 6 * (total - pos * d) + 12 * layers * d * seq
    assert flops_per_token(model, seq) == flops_per_token(cfg, seq)
    frozen = sum(p.numel() for p in model.transformer.h[0].parameters())
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - frozen


def test_presets_are_roughly_their_names() -> None:
    from transformers import AutoModelForCausalLM

    expected = {"50M": (40e6, 70e6), "125M": (110e6, 150e6), "1B": (0.9e9, 1.3e9)}
    for preset, (lo, hi) in expected.items():
        cfg = build_config("llama", 32000, preset)
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = AutoModelForCausalLM.from_config(cfg)
        assert lo < count_parameters(model) < hi, preset
    assert set(PRESETS) == {"tiny", "50M", "125M", "1B"}
