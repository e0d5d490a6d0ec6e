"""FastDropout keeps nn.Dropout's statistics and gradient, and replaces peft's LoRA dropouts."""

from __future__ import annotations

import torch

from lmforge.models.fast_dropout import FastDropout, use_fast_dropout


def test_drop_rate_scaling_and_expectation() -> None:
    torch.manual_seed(0)
    x = torch.ones(2000, 1000)
    layer = FastDropout(0.1).train()
    y = layer(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.005


def test_gradient_is_masked_and_scaled_like_the_output() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    y = FastDropout(0.3).train()(x)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert (x.grad[~kept] == 0).all()


def test_eval_mode_and_seed_reproducibility() -> None:
    x = torch.randn(16, 16)
    layer = FastDropout(0.5)
    assert torch.equal(layer.eval()(x), x)
    layer.train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(a, layer(x))


def test_swaps_lora_dropouts(tiny_model_dir) -> None:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear"))
    assert use_fast_dropout(model) == 14  # 7 projections x 2 layers
    assert not any(isinstance(m, torch.nn.Dropout) and m.p == 0.05 for m in model.modules())
