"""Batches of examples: padded to the longest in the batch, grouped by length to waste little on padding.

The order is a pure function of (seed, epoch), so a resumed run can skip to the exact
batch it stopped at.

Sample packing (``sequence_len`` given to :func:`iterate_batches`): several examples share one
row of at most ``sequence_len`` tokens. Each packed batch carries ``position_ids`` that restart
at 0 for every example; with ``attention_mask`` left out of the forward, transformers builds a
block-diagonal causal mask from them (no attention across examples, for sdpa and eager). The
first label of each example is ignored: it would be predicted from the previous example.

Packed batches also carry ``cu_seq_lens``: where each segment (an example, or a row's padding)
starts in the micro-batch flattened to one row of B × width tokens, and the total. Flash-attention's
variable-length kernel takes exactly these; transformers infers them from ``position_ids`` only when a
batch holds a single row, so with ``micro_batch_size`` > 1 lmforge's loss passes them (built here, on
the host: no device sync).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from lmforge.data.examples import IGNORE_INDEX, Example

Batch = dict[str, torch.Tensor]

HOST_COPY = "host_copy"  # the key under which a device batch carries its CPU original (see HostCopy)


class HostCopy:
    """The CPU original of a batch moved to an accelerator, carried in the device batch under HOST_COPY.

    A loss reads data-dependent facts (how many labels, where they are, whether the mask pads
    anything) from these host tensors: read from the device copy, each would be a host-device
    sync that stalls the GPU queue. A plain object, not a dict or tensor, so DDP/FSDP's input
    moving (torch.distributed.utils._recursive_to) passes it through untouched.
    """

    __slots__ = ("batch",)

    def __init__(self, batch: Batch) -> None:
        self.batch = batch


def host_batch(batch: dict) -> Batch:
    """The CPU tensors of `batch`: its HostCopy when it carries one, else the batch itself (on the CPU already,
    or a caller that moved it without one: reading it then syncs, but stays correct)."""
    copy = batch.get(HOST_COPY)
    return copy.batch if isinstance(copy, HostCopy) else batch


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
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if any(e.images for e in examples):
        batch.update(collate_images([e.images for e in examples if e.images]))
    for key in dict.fromkeys(k for e in examples for k in (e.token_types or {})):
        # which tokens are image tokens (0: text, as for the padding), right-padded like the ids
        types = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            if example.token_types and key in example.token_types:
                values = torch.as_tensor(example.token_types[key]).view(-1)
                types[row, :values.numel()] = values
        batch[key] = types
    return batch


def collate_images(rows: Sequence[dict[str, torch.Tensor]]) -> Batch:
    """The image tensors of a batch's rows joined along dim 0, as the model reads them (LLaVA's pixel_values
    [images, 3, H, W], Qwen2-VL's patches and image_grid_thw); where rows differ past dim 0 (Idefics3's
    [1, images, 3, H, W] with a different image count per row), padded with zeros, which such models skip."""
    out: Batch = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        tensors = [row[key] for row in rows if key in row]
        widest = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for t in tensors:
            pad = [amount for d in reversed(range(1, t.dim())) for amount in (0, widest[d - 1] - t.shape[d])]
            padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
        out[key] = torch.cat(padded)
    return out


def segment_boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seq_lens`` of a packed batch: the start of every segment (each position 0) in the batch flattened
    to one row, then the total token count (int32, as flash_attn_varlen_func wants)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    return torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)


def pad_batch(batch: Batch, width: int, pad_token_id: int) -> Batch:
    """Right-pad a batch to `width` tokens (pad_to_sequence_len: every batch the same shape); the loss is unchanged:
    padding gets attention 0 and label -100 (packed batches: position ids of a block of its own)."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = {key: torch.nn.functional.pad(value, (0, extra), value=fill.get(key, 0)) for key, value in batch.items()
           if key != "cu_seq_lens"}
    if "position_ids" in batch:
        tail = torch.arange(extra).expand(batch["input_ids"].shape[0], extra)
        last = batch["position_ids"][:, -1:] + 1
        padded_tail = batch["attention_mask"][:, -1:].eq(0)  # the row already ends in padding: continue that block
        out["position_ids"][:, -extra:] = torch.where(padded_tail, last + tail, tail)
        out["cu_seq_lens"] = segment_boundaries(out["position_ids"])
    return out


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


def pack_order(lengths: Sequence[int], sequence_len: int, seed: int, epoch: int, pool: int = 4096) -> list[list[int]]:
    """Indices of each packed row for one epoch: shuffled by (seed, epoch), then first-fit
    decreasing within pools of `pool` examples (random order across pools, dense rows within)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), pool):
        bins: list[list[int]] = []
        room: list[int] = []
        for i in sorted(order[start : start + pool], key=lambda i: -lengths[i]):
            n = min(lengths[i], sequence_len)
            for b, free in enumerate(room):
                if n <= free:
                    bins[b].append(i)
                    room[b] -= n
                    break
            else:
                bins.append([i])
                room.append(sequence_len - n)
        rows += bins
    rng.shuffle(rows)
    return rows


def packing_efficiency(lengths: Sequence[int], sequence_len: int, seed: int = 0) -> tuple[float, int]:
    """(share of packed-row slots holding real tokens, packed rows) for epoch 0."""
    rows = pack_order(lengths, sequence_len, seed, 0)
    return sum(min(n, sequence_len) for n in lengths) / max(len(rows) * sequence_len, 1), len(rows)


def collate_packed(rows: Sequence[Sequence[Example]], pad_token_id: int) -> Batch:
    """Each row the concatenation of its examples; position ids restart per example; right-padded."""
    width = max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(example.labels[1:])
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        attention_mask[r, :at] = 1
        position_ids[r, at:] = torch.arange(width - at)  # padding: a block of its own
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids,
            "cu_seq_lens": segment_boundaries(position_ids)}


def packed_batch_order(lengths: Sequence[int], batch_size: int, sequence_len: int, seed: int, epoch: int) -> list[list[list[int]]]:
    rows = pack_order(lengths, sequence_len, seed, epoch)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def iterate_batches(
    examples: Sequence[Example], batch_size: int, pad_token_id: int, seed: int, epoch: int, group_by_length: bool = True, skip: int = 0,
    sequence_len: int | None = None,
) -> Iterator[Batch]:
    """Collated batches of one epoch, skipping the first `skip` (for resume).

    With `sequence_len` (sample packing), each batch holds `batch_size` packed rows.
    """
    lengths = [len(e) for e in examples]
    if sequence_len is not None:
        for rows in packed_batch_order(lengths, batch_size, sequence_len, seed, epoch)[skip:]:
            yield collate_packed([[examples[i] for i in row] for row in rows], pad_token_id)
        return
    for indices in batch_order(lengths, batch_size, seed, epoch, group_by_length)[skip:]:
        yield collate([examples[i] for i in indices], pad_token_id)


def eval_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int, sequence_len: int | None = None) -> Iterator[Batch]:
    """Eval batches in a fixed order: length-sorted (minimal padding), or packed (seed 0) with `sequence_len`."""
    if sequence_len is not None:
        yield from iterate_batches(examples, batch_size, pad_token_id, seed=0, epoch=0, sequence_len=sequence_len)
        return
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
