"""Under bf16 autocast, LoRA layers keep their bf16 input (no fp32 round trip): same loss and gradients."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from lmforge.train.loop import LoopSettings, _adapter_input_kept
from tests.conftest import tiny_llama_config


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, settings: LoopSettings, kept: bool) -> tuple:
    model.zero_grad()
    seen: list[torch.dtype] = []
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "_cast_input_dtype"))
    hook = layer.lora_A["default"].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if kept:
            with _adapter_input_kept(model, settings):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, seen[0], layer.cast_input_dtype_enabled


def test_kept_input_gives_the_same_loss_and_gradients_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=128)).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():  # a trained adapter: B nonzero, so the A path carries gradient
        if "lora_" in name:
            p.data = torch.randn_like(p) * 0.05
    ids = torch.randint(0, 128, (2, 24))
    settings = LoopSettings(total_steps=1, autocast_dtype=torch.bfloat16)
    loss_cast, grads_cast, dtype_cast, _ = _loss_and_grads(model, ids, settings, kept=False)
    loss_kept, grads_kept, dtype_kept, enabled_after = _loss_and_grads(model, ids, settings, kept=True)
    assert dtype_cast == torch.float32 and dtype_kept == torch.bfloat16  # the lever is on (fails without it)
    assert enabled_after is True  # restored on leaving
    # The A matmul sees the same bf16 values; only the fp32->bf16 rounding order of summed gradients can differ.
    assert torch.allclose(loss_cast, loss_kept, atol=0, rtol=0)
    for name, g in grads_cast.items():
        assert torch.allclose(g, grads_kept[name], rtol=1e-2, atol=1e-4), name


def test_left_alone_without_autocast() -> None:
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config(vocab_size=128)),
                           LoraConfig(r=4, target_modules="all-linear"))
    with _adapter_input_kept(model, LoopSettings(total_steps=1, autocast_dtype=None)):
        assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())
