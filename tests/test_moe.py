"""Mixture-of-experts models train with their router's load-balancing loss, as transformers computes it.

A tiny Mixtral and a tiny Qwen3-MoE built from config: with ``output_router_logits`` on (axolotl sets it
through ``model_config``), lmforge's token-weighted loss equals transformers' own ``loss`` (cross-entropy
plus ``router_aux_loss_coef`` times the aux loss), and differs from the bare cross-entropy by that term.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmforge.data.batching import collate
from lmforge.data.prepare import IGNORE_INDEX, Example
from lmforge.train.loss import causal_lm_loss, router_aux_loss_coef
from lmforge.train.objectives import CausalLM


def tiny_moe(kind: str, router_logits: bool) -> Any:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, output_router_logits=router_logits, router_aux_loss_coef=0.3)
    if kind == "mixtral":
        config = MixtralConfig(num_local_experts=4, **common)
    else:
        config = Qwen3MoeConfig(num_experts=4, moe_intermediate_size=24, head_dim=8, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in (12, 9):
        ids = torch.randint(3, 97, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 4 + ids[4:]  # a prompt, then the trained answer
        examples.append(Example(ids, labels))
    return collate(examples, pad_token_id=0)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_loss_includes_the_router_aux_loss_equal_to_transformers(kind: str) -> None:
    model, data = tiny_moe(kind, router_logits=True), batch()
    assert router_aux_loss_coef(model) == pytest.approx(0.3)
    with torch.no_grad():
        loss_sum, count = CausalLM()(model, data)[:2]
        theirs = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"])
        plain = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"],
                      output_router_logits=False).loss
    assert float(loss_sum / count) == pytest.approx(float(theirs.loss), abs=1e-5)
    assert float(theirs.aux_loss) > 0.5  # the term is there, and large enough that leaving it out would show
    assert float(loss_sum / count) - float(plain) == pytest.approx(0.3 * float(theirs.aux_loss), abs=1e-5)


def test_without_router_logits_the_loss_is_plain_cross_entropy() -> None:
    model, data = tiny_moe("mixtral", router_logits=False), batch()
    assert router_aux_loss_coef(model) is None
    with torch.no_grad():
        loss_sum, count = causal_lm_loss(model, data)
        theirs = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"]).loss
    assert float(loss_sum / count) == pytest.approx(float(theirs), abs=1e-5)


def test_the_aux_loss_gets_gradients_into_the_router() -> None:
    model, data = tiny_moe("mixtral", router_logits=True).train(), batch()
    loss_sum, _ = causal_lm_loss(model, data)
    loss_sum.backward()
    router = next(p for n, p in model.named_parameters() if "gate" in n and p.grad is not None)
    assert router.grad.abs().sum() > 0


# --- quantize_moe_experts, experts_implementation and the MoE kernel switches ---------------------------------------

@pytest.fixture(scope="module")
def tiny_mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-mixtral")
    tokenizer = build_tiny_tokenizer(folder)
    model = tiny_moe("mixtral", router_logits=False)
    model.resize_token_embeddings(len(tokenizer))
    model.config.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def moe_cfg(model_dir: Any, alpaca_file: Any, tmp_path: Any, **extra: object) -> Any:
    from conftest import tiny_config, write_config
    from lmforge.config import load_config

    return load_config(str(write_config(tmp_path / "c.yml", tiny_config(model_dir, alpaca_file, tmp_path / "out", **extra))))


def expert_weights(model: Any) -> list[tuple[str, torch.dtype]]:
    return [(n, p.dtype) for n, p in model.named_parameters() if ".experts." in n]


def test_quantize_moe_experts_holds_the_experts_in_4_bit(tiny_mixtral_dir: Any, alpaca_file: Any, tmp_path: Any) -> None:
    from lmforge.models.load import load_tokenizer
    from lmforge.models.setup import training_model

    tokenizer = load_tokenizer(str(tiny_mixtral_dir))
    qlora = dict(adapter="qlora", load_in_4bit=True, lora_target_linear=True)
    plain = training_model(moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, **qlora), tokenizer, torch.device("cpu"), bf16=False)
    assert {dtype for _, dtype in expert_weights(plain)} <= {torch.float32, torch.bfloat16}  # load_in_4bit skips 3D experts
    said: list[str] = []
    cfg = moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, quantize_moe_experts=True, **qlora)
    model = training_model(cfg, tokenizer, torch.device("cpu"), bf16=False, say=said.append)
    quantized = expert_weights(model)
    assert len(quantized) == 4 and {dtype for _, dtype in quantized} == {torch.uint8}  # 2 layers x (gate_up, down)
    assert said == ["quantize_moe_experts: 4 expert weight tensors held in 4 bit"]
    ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    with torch.no_grad():  # the 4-bit experts compute what the full-precision ones do, up to nf4's rounding
        close = (model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max()
    assert float(close) < 0.05


def test_quantize_moe_experts_with_an_8_bit_base_holds_the_experts_in_int8(tiny_mixtral_dir: Any, alpaca_file: Any, tmp_path: Any) -> None:
    from lmforge.models.load import load_tokenizer
    from lmforge.models.setup import training_model

    tokenizer = load_tokenizer(str(tiny_mixtral_dir))
    lora8 = dict(adapter="lora", load_in_8bit=True, lora_target_linear=True)
    plain = training_model(moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, **lora8), tokenizer, torch.device("cpu"), bf16=False)
    said: list[str] = []
    cfg = moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, quantize_moe_experts=True, **lora8)
    model = training_model(cfg, tokenizer, torch.device("cpu"), bf16=False, say=said.append)
    assert {dtype for _, dtype in expert_weights(model)} == {torch.int8} and len(expert_weights(model)) == 4
    assert said == ["quantize_moe_experts: 4 expert weight tensors held in 8 bit"]
    ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max()) < 0.02


def test_quantize_moe_experts_without_a_4_bit_base_is_refused_in_validate(tiny_mixtral_dir: Any, alpaca_file: Any, tmp_path: Any) -> None:
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="quantize_moe_experts") as error:
        moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, quantize_moe_experts=True)
    assert "c.yml:" in str(error.value.where)


@pytest.mark.parametrize("requested, runs", [("batched_mm", "batched_mm"), ("eager", "eager"), ("scattermoe", None)])
def test_experts_implementation_is_what_the_model_runs(tiny_mixtral_dir: Any, alpaca_file: Any, tmp_path: Any,
                                                       requested: str, runs: str | None) -> None:
    from lmforge.models.load import load_tokenizer
    from lmforge.models.setup import training_model

    cfg = moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, experts_implementation=requested)
    assert cfg.model.experts_implementation == runs
    assert [n.key for n in cfg.notices if "experts" in n.key] == ([] if runs else ["experts_implementation"])
    model = training_model(cfg, load_tokenizer(str(tiny_mixtral_dir)), torch.device("cpu"), bf16=False)
    default = training_model(moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path), load_tokenizer(str(tiny_mixtral_dir)),
                             torch.device("cpu"), bf16=False)
    expected = runs or default.get_base_model().config._experts_implementation
    assert model.get_base_model().config._experts_implementation == expected


def test_moe_kernel_switches_are_accepted_with_a_notice_each(tiny_mixtral_dir: Any, alpaca_file: Any, tmp_path: Any) -> None:
    cfg = moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, use_scattermoe=True, use_sonicmoe=True, use_kernels=True,
                  llama4_linearized_experts=True, plugins=["axolotl.integrations.kernels.KernelsPlugin"])
    notices = {n.key: n.text for n in cfg.notices}
    for key in ("use_scattermoe", "use_sonicmoe", "use_kernels", "llama4_linearized_experts"):
        assert key in notices and "same" in notices[key], key
    assert any("kernels" in key for key in notices if key.startswith("plugins"))


@pytest.mark.parametrize("keys, refused", [
    ({"tensor_parallel_size": 2}, "tensor_parallel_size"), ({"context_parallel_size": 2}, "context_parallel_size"),
    ({"expert_parallel_size": 2}, "expert_parallel_size"), ({"ebft": {"mode": "strided"}}, "ebft"),
    ({"diffusion": {"mask_token_id": 3}}, "diffusion"),
])
def test_what_stays_out_is_refused_in_one_line_naming_the_tool(tiny_mixtral_dir: Any, alpaca_file: Any, tmp_path: Any,
                                                               keys: dict, refused: str) -> None:
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError) as error:
        moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, **keys)
    line = str(error.value)
    assert refused in line and "out of scope" in line and "axolotl" in line and "\n" not in line


def test_a_lora_target_modules_string_is_a_regex_as_in_axolotl(tiny_mixtral_dir: Any, alpaca_file: Any, tmp_path: Any) -> None:
    """axolotl hands a string to peft as is: a regex over full module names (34 of its examples use one)."""
    from lmforge.models.load import load_tokenizer
    from lmforge.models.setup import training_model

    regex = r"model.layers.[\d]+.(mlp|cross_attn|self_attn).(q|v)_proj"
    cfg = moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, lora_target_linear=False, lora_target_modules=regex)
    model = training_model(cfg, load_tokenizer(str(tiny_mixtral_dir)), torch.device("cpu"), bf16=False)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted and all(n.endswith(("self_attn.q_proj", "self_attn.v_proj")) for n in adapted)
    assert len(adapted) == 4  # 2 layers x (q, v): the regex, not a layer named like it
    plain = moe_cfg(tiny_mixtral_dir, alpaca_file, tmp_path, lora_target_linear=False, lora_target_modules="q_proj")
    named = training_model(plain, load_tokenizer(str(tiny_mixtral_dir)), torch.device("cpu"), bf16=False)
    assert len({n for n, _ in named.named_parameters() if ".lora_A" in n}) == 2
