"""QLoRA through bitsandbytes on CPU: config building, and gradients that match a
de-quantized float reference, also after ``generate`` (the bitsandbytes 0.50 CPU
repacking bug that :func:`disable_cpu_weight_packing` works around)."""

from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from conftest import tiny_llama_config  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.models.quantize import (  # noqa: E402
    bnb_config,
    disable_cpu_weight_packing,
    parse_dtype,
    prepare_kbit_model,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, vocab_size=128, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(tiny_llama_config(**CFG)).save_pretrained(path)
    return str(path)


def _load_4bit(path: str) -> torch.nn.Module:
    config = bnb_config(load_in_4bit=True, compute_dtype="float32")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)


def _lora() -> LoraConfig:
    # Random B (not zeros) so that every LoRA A gets a non-zero gradient to compare.
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


def _reference(qmodel: torch.nn.Module) -> torch.nn.Module:
    """A float model holding exactly the de-quantized 4-bit weights and the same LoRA."""
    ref = LlamaForCausalLM(tiny_llama_config(**CFG))
    state = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = name.replace("base_model.model.", "", 1).removesuffix(".base_layer") + ".weight"
            state[key] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    for name, param in qmodel.named_parameters():
        if "lora_" not in name and "base_layer" not in name:
            state[name.replace("base_model.model.", "", 1)] = param.detach().float()
    missing, _ = ref.load_state_dict(state, strict=False)
    assert not [k for k in missing if "rotary" not in k], missing
    pref = get_peft_model(ref, _lora())
    qparams = dict(qmodel.named_parameters())
    for name, param in pref.named_parameters():
        if "lora_" in name:
            param.data.copy_(qparams[name].data)
    return pref


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.flatten().clone() for n, p in model.named_parameters() if "lora_" in n}


def _grad_cosines(qmodel: torch.nn.Module, ref: torch.nn.Module) -> tuple[float, float, list[str]]:
    """(overall cosine, worst per-tensor cosine, warnings) of one training step's LoRA grads."""
    torch.manual_seed(3)
    ids = torch.randint(0, CFG["vocab_size"], (2, 16))
    qmodel.train()
    ref.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    gq, gr = _lora_grads(qmodel), _lora_grads(ref)
    assert gq.keys() == gr.keys() and len(gq) == 2 * len(TARGETS) * CFG["num_hidden_layers"]
    cos = torch.nn.functional.cosine_similarity
    overall = cos(torch.cat(list(gq.values())), torch.cat(list(gr.values())), dim=0).item()
    worst = min(cos(gq[k], gr[k], dim=0).item() for k in gq)
    return overall, worst, [str(w.message) for w in caught]


def _generate(model: torch.nn.Module) -> None:
    model.eval()
    ids = torch.randint(0, CFG["vocab_size"], (1, 4))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)


def _packed(model: torch.nn.Module) -> int:
    return sum(
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def test_bnb_config_4bit_fields() -> None:
    cfg = bnb_config(load_in_4bit=True, quant_type="fp4", double_quant=False, compute_dtype="bf16")
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "fp4"
    assert cfg.bnb_4bit_use_double_quant is False
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config(load_in_8bit=True).load_in_8bit


@pytest.mark.parametrize(
    "kwargs, where",
    [
        (dict(load_in_4bit=True, load_in_8bit=True), "load_in_4bit"),
        (dict(), "load_in_4bit"),
        (dict(load_in_4bit=True, quant_type="int4"), "bnb_4bit_quant_type"),
        (dict(load_in_4bit=True, compute_dtype="float64"), "bnb_4bit_compute_dtype"),
    ],
)
def test_bnb_config_refuses_bad_args(kwargs: dict, where: str) -> None:
    with pytest.raises(LmforgeError) as info:
        bnb_config(**kwargs)
    assert where in (info.value.where or "")
    assert info.value.fix


def test_parse_dtype() -> None:
    assert parse_dtype("torch.float16") == torch.float16
    assert parse_dtype(torch.bfloat16) == torch.bfloat16


def test_prepare_refuses_float_model(tiny_dir: str) -> None:
    with pytest.raises(LmforgeError, match="not loaded in 4 or 8 bit"):
        prepare_kbit_model(LlamaForCausalLM.from_pretrained(tiny_dir))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_qlora_grads_match_dequantized_reference_also_after_generate(tiny_dir: str, checkpointing: bool) -> None:
    model = prepare_kbit_model(_load_4bit(tiny_dir), gradient_checkpointing=checkpointing)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, _lora())
    ref = _reference(peft_model)

    overall, worst, _ = _grad_cosines(peft_model, ref)
    assert overall > 0.99 and worst > 0.99, (overall, worst)

    peft_model.zero_grad()
    ref.zero_grad()
    _generate(peft_model)
    assert _packed(peft_model) == 0
    overall, worst, caught = _grad_cosines(peft_model, ref)
    assert overall > 0.99 and worst > 0.99, (overall, worst)
    assert not [w for w in caught if "autograd kernel" in w]


def _unfixed_peft_model(tiny_dir: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = prepare_model_for_kbit_training(_load_4bit(tiny_dir), use_gradient_checkpointing=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, _lora())
    return peft_model, _reference(peft_model)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacking only happens on AVX512-BF16 CPUs")
def test_without_fix_generate_breaks_grads(tiny_dir: str) -> None:
    """Shows the bug is real here, so the test above is able to fail. If a bitsandbytes
    upgrade makes this fail, the upstream bug is gone and the workaround can go."""
    peft_model, ref = _unfixed_peft_model(tiny_dir)
    _generate(peft_model)
    assert _packed(peft_model) > 0
    overall, worst, caught = _grad_cosines(peft_model, ref)
    assert worst < 0.99, (overall, worst)
    assert any("autograd kernel" in w for w in caught)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacking only happens on AVX512-BF16 CPUs")
def test_disable_packing_repairs_already_packed_model(tiny_dir: str) -> None:
    peft_model, ref = _unfixed_peft_model(tiny_dir)
    _generate(peft_model)
    assert _packed(peft_model) > 0
    assert disable_cpu_weight_packing(peft_model) == len(TARGETS) * CFG["num_hidden_layers"]
    assert _packed(peft_model) == 0
    overall, worst, caught = _grad_cosines(peft_model, ref)
    # the repack stores absmax in bf16, so the repaired weights differ very slightly
    assert overall > 0.99 and worst > 0.99, (overall, worst)
    assert not [w for w in caught if "autograd kernel" in w]
