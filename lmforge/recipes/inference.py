"""`lmforge inference`: answer prompts with the base model or a trained adapter, streaming."""

from __future__ import annotations

import sys

import torch

from lmforge.config import LmforgeConfig
from lmforge.infer.generate import answer, build_prompt, load_for_inference
from lmforge.train.telemetry import pick_device, resolve_bf16


def run_inference(
    cfg: LmforgeConfig, lora_model_dir: str | None, prompt: str | None, max_new_tokens: int = 256, temperature: float = 0.0
) -> list[str]:
    device = pick_device()
    dtype = torch.bfloat16 if resolve_bf16(cfg.training.bf16, device) else torch.float32
    tokenizer, model = load_for_inference(cfg, lora_model_dir, dtype)
    model.to(device)
    prompts = [prompt] if prompt is not None else (line.rstrip("\n") for line in sys.stdin if line.strip())
    answers = []
    for text in prompts:
        answers.append(answer(model, tokenizer, build_prompt(cfg, tokenizer, text), max_new_tokens=max_new_tokens, temperature=temperature))
    return answers
