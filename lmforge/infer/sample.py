"""A trained model's sample at the end of a run: greedy continuation (causal LM) or fill-mask (masked LM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmforge.errors import LmforgeError


@torch.no_grad()
def clm_sample(model: Any, tokenizer: Any, prompt: str, device: torch.device, max_new_tokens: int = 60) -> str:
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@torch.no_grad()
def fill_mask_sample(model: Any, tokenizer: Any, text: str, device: torch.device, top_k: int = 5) -> list[tuple[str, float]]:
    """The top_k fillers of the first mask token in `text`, with their probabilities."""
    model.eval()
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=device)
    where = (ids[0] == tokenizer.mask_token_id).nonzero()
    if not len(where):
        raise LmforgeError(f"the sample has no {tokenizer.mask_token}", where="sample_prompt",
                           fix=f"write {tokenizer.mask_token} where a word should be filled in")
    probs = model(input_ids=ids).logits[0, int(where[0])].softmax(-1)
    top = probs.topk(top_k)
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def sample_text(tokenizer: Any, window: Sequence[int], objective: str) -> str:
    """A prompt from a held-out passage: its start to continue (clm), or with one word masked (mlm)."""
    ids = [int(i) for i in window[:24] if int(i) not in tokenizer.all_special_ids]
    if objective == "clm":
        return tokenizer.decode(ids[:12])
    middle = len(ids) // 2
    return tokenizer.decode(ids[:middle]) + tokenizer.mask_token + tokenizer.decode(ids[middle + 1:])
