"""`lmforge inference`: answer prompts with the base model or a trained adapter, streaming."""

from __future__ import annotations

import io
import json
import sys

import torch

from lmforge.config import LmforgeConfig
from lmforge.infer.generate import answer, build_prompt, load_for_inference
from lmforge.train.telemetry import pick_device, resolve_bf16


def run_inference(
    cfg: LmforgeConfig, lora_model_dir: str | None, prompt: str | None, max_new_tokens: int = 256, temperature: float = 0.0,
    jsonl: bool = False,
) -> list[str]:
    """Answer `prompt`, or each line of stdin. Several prompts: each answer is printed under its
    prompt, or (`jsonl`) as one JSON line {"prompt", "answer"} per prompt, for scripts."""
    device = pick_device()
    dtype = torch.bfloat16 if resolve_bf16(cfg.training.bf16, device) else torch.float32
    tokenizer, model = load_for_inference(cfg, lora_model_dir, dtype)
    model.to(device)
    prompts = [prompt] if prompt is not None else (line.rstrip("\n") for line in sys.stdin if line.strip())
    answers = []
    for number, text in enumerate(prompts, start=1):
        full = build_prompt(cfg, tokenizer, text)
        if jsonl:
            reply = answer(model, tokenizer, full, out=io.StringIO(), max_new_tokens=max_new_tokens, temperature=temperature)
            print(json.dumps({"prompt": text, "answer": reply}, ensure_ascii=False), flush=True)
        else:
            if prompt is None:  # prompts from stdin are not on the screen: show each above its answer
                print(f"{'' if number == 1 else chr(10)}### prompt {number}: {text}", flush=True)
            reply = answer(model, tokenizer, full, out=sys.stdout, max_new_tokens=max_new_tokens, temperature=temperature)
        answers.append(reply)
    return answers
