"""Perplexity: of held-out answers given their prompts, and of held-out general text (the forgetting check).

Both are exp(mean negative log-likelihood per scored token), summed over every scored token of every
row (a long row weighs more, as in a corpus perplexity), in fp32 logits. Rows run in right-padded
batches; padding never enters a sum. tests/test_eval.py checks the number against a plain
``model(input_ids, labels=...)`` computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class NllSum:
    """Summed negative log-likelihood over ``tokens`` scored tokens."""

    nll: float = 0.0
    tokens: int = 0

    def add(self, other: "NllSum") -> None:
        self.nll += other.nll
        self.tokens += other.tokens

    @property
    def perplexity(self) -> float | None:
        return math.exp(min(self.nll / self.tokens, 50.0)) if self.tokens else None


@torch.inference_mode()
def nll_sums(model: Any, rows: Sequence[tuple[list[int], int]], batch_size: int = 4, pad_id: int = 0) -> list[NllSum]:
    """Per row ``(ids, start)``: the NLL of ids[start:] given what precedes each token (start >= 1)."""
    device = next(model.parameters()).device
    out: list[NllSum] = []
    for first in range(0, len(rows), batch_size):
        batch = rows[first:first + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        for row, (ids, start) in enumerate(batch):
            start = max(1, start)
            targets = input_ids[row, start:len(ids)]
            logprobs = torch.log_softmax(logits[row, start - 1:len(ids) - 1].float(), dim=-1)
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out.append(NllSum(-float(picked.sum()), int(targets.numel())))
    return out


def answer_rows(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], max_len: int | None = None) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, where the answer starts) per example; a too-long row keeps the answer's start."""
    rows = []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids
        if max_len is not None and len(p) + len(a) > max_len:
            p = p[max(0, len(p) - max_len // 2):]
            a = a[:max_len - len(p)]
        rows.append((p + a, len(p)))
    return rows


def answer_perplexity(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                      batch_size: int = 4, max_len: int | None = None) -> tuple[float | None, list[NllSum]]:
    """The perplexity of the references given their prompts (only answer tokens are scored), and each row's sums."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = nll_sums(model, answer_rows(tokenizer, prompts, answers, max_len), batch_size, pad)
    total = NllSum()
    for s in sums:
        total.add(s)
    return total.perplexity, sums


def text_windows(tokenizer: Any, text: str, window: int, max_windows: int) -> list[list[int]]:
    """The text's tokens cut into consecutive windows of ``window`` tokens (at most ``max_windows``, the last whole one
    dropped if short)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) == window] or windows[:1]
    return windows[:max_windows]


def text_perplexity(model: Any, tokenizer: Any, text: str, window: int = 256, max_windows: int = 16,
                    batch_size: int = 4) -> tuple[float | None, int]:
    """Perplexity of plain text in windows (every token but each window's first is scored); and the tokens scored."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = NllSum()
    for s in nll_sums(model, [(w, 1) for w in text_windows(tokenizer, text, window, max_windows)], batch_size, pad):
        total.add(s)
    return total.perplexity, total.tokens
