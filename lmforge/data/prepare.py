"""Rows → token ids and labels: formats applied, EOS appended, prompts masked, lengths enforced.

Nothing is dropped silently: truncated rows and rows left with no trainable token are
counted in :class:`PrepareStats`, which the training log prints.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lmforge.config.sections import DataSection, DatasetSpec
from lmforge.data.formats import Segment, get_format
from lmforge.data.sources import read_rows
from lmforge.errors import LmforgeError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PrepareStats:
    rows: Counter = field(default_factory=Counter)  # per source path
    truncated: int = 0
    no_trainable_tokens: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def summary(self) -> str:
        sources = ", ".join(f"{path}: {n} rows" for path, n in self.rows.items())
        share = self.label_tokens / max(self.tokens, 1)
        return (
            f"{sources}; {self.tokens:,} tokens, {share:.0%} trained on; "
            f"{self.truncated} truncated to sequence_len, {self.no_trainable_tokens} skipped with no response token left"
        )


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    stats: PrepareStats


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def tokenize_rows(
    rows: list[list[Segment]], tokenizer: Any, sequence_len: int, train_on_inputs: bool, stats: PrepareStats
) -> list[Example]:
    """Tokenize segment lists in one batched call; truncate to sequence_len; mask untrained segments."""
    flat = [segment.text for segment_list in rows for segment in segment_list]
    encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos = tokenizer.eos_token_id
    examples: list[Example] = []
    cursor = 0
    for segment_list in rows:
        ids: list[int] = list(bos)
        labels: list[int] = [IGNORE_INDEX] * len(bos)
        for segment in segment_list:
            piece = encoded[cursor]
            cursor += 1
            ids += piece
            labels += piece if (segment.train or train_on_inputs) else [IGNORE_INDEX] * len(piece)
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
        if len(ids) > sequence_len:
            stats.truncated += 1
            ids, labels = ids[:sequence_len], labels[:sequence_len]
        # The model sees labels shifted by one, so the first position never counts.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.no_trainable_tokens += 1
            continue
        stats.tokens += len(ids)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
        examples.append(Example(ids, labels))
    return examples


def rows_to_segments(spec: DatasetSpec, index: int, stats: PrepareStats) -> list[list[Segment]]:
    """Read one dataset entry and apply its format; a bad row raises with its file:line."""
    fmt = get_format(spec.type, where=f"datasets[{index}].type")
    out = []
    for row in read_rows(spec.path, spec.ds_type, spec.data_files, spec.split, spec.name):
        out.append(fmt.segments(row.values, row.where))
    if not out:
        raise LmforgeError("dataset has no rows", where=spec.path, fix="check the file is not empty")
    stats.rows[spec.path] += len(out)
    return out


def split_eval(examples: list[Example], val_set_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a share (<1) or a count (>=1) of examples, chosen by seed."""
    if not val_set_size:
        return examples, []
    count = int(val_set_size) if val_set_size >= 1 else max(1, round(len(examples) * val_set_size))
    if count >= len(examples):
        raise LmforgeError(
            f"val_set_size {val_set_size} leaves no training examples out of {len(examples)}",
            where="val_set_size",
            fix="use a smaller share or count",
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def prepare(data: DataSection, tokenizer: Any, seed: int) -> PreparedData:
    """Every dataset entry read, formatted, tokenized and split into train and eval."""
    stats = PrepareStats()
    segments: list[list[Segment]] = []
    for index, spec in enumerate(data.datasets):
        segments += rows_to_segments(spec, index, stats)
    examples = tokenize_rows(segments, tokenizer, data.sequence_len, data.train_on_inputs, stats)
    if not examples:
        raise LmforgeError(
            f"no usable examples: all {sum(stats.rows.values())} rows lost their response to truncation",
            where="sequence_len",
            fix=f"raise sequence_len above {data.sequence_len}",
        )
    train, held_out = split_eval(examples, data.val_set_size, seed)
    return PreparedData(train, held_out, stats)
