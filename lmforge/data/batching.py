"""Batches of examples: padded to the longest in the batch, grouped by length to waste little on padding.

The order is a pure function of (seed, epoch), so a resumed run can skip to the exact
batch it stopped at.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from lmforge.data.prepare import IGNORE_INDEX, Example

Batch = dict[str, torch.Tensor]


def collate(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad to the longest example; padding gets attention 0 and label -100."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Indices of each batch for one epoch.

    With grouping, examples are shuffled, cut into pools of 64 batches, each pool sorted by
    length and batched, then the batches shuffled: similar lengths share a batch (little
    padding) while the order stays random.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        pool = batch_size * 64
        order = [i for start in range(0, len(order), pool) for i in sorted(order[start : start + pool], key=lengths.__getitem__)]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def iterate_batches(
    examples: Sequence[Example], batch_size: int, pad_token_id: int, seed: int, epoch: int, group_by_length: bool = True, skip: int = 0
) -> Iterator[Batch]:
    """Collated batches of one epoch, skipping the first `skip` (for resume)."""
    lengths = [len(e) for e in examples]
    for indices in batch_order(lengths, batch_size, seed, epoch, group_by_length)[skip:]:
        yield collate([examples[i] for i in indices], pad_token_id)


def eval_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int) -> Iterator[Batch]:
    """Eval batches in a fixed, length-sorted order (deterministic, minimal padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
