"""The prepared data's types: tokenized examples, both splits, and what preparing them counted.

Their own module so that the preparer (data.prepare) and the cache that stores its output
(data.cache) both import them without importing each other."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError

IGNORE_INDEX = -100  # the label of a position no loss is computed for (torch cross_entropy's ignore_index)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # An image chat's pixel tensors (pixel_values, and image_sizes / image_grid_thw / pixel_attention_mask where the
    # processor makes them), each with the row's images along dim 0; None for text.
    images: dict[str, Any] | None = None
    # Its per-token type ids where the processor makes them (Gemma 3's token_type_ids, the M-RoPE models'
    # mm_token_type_ids: which tokens are image tokens), each [1, len(input_ids)]; the model needs them to train.
    token_types: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PrepareStats:
    rows: Counter = field(default_factory=Counter)  # rows read, per source path
    truncated: int = 0
    no_trainable_tokens: int = 0
    tokens: int = 0
    label_tokens: int = 0
    bad_rows: int = 0  # malformed or failing rows skipped with skip_bad_rows
    bad_examples: list[str] = field(default_factory=list)  # the first few, "where: why"
    hook_skipped: int = 0
    dropped: int = 0  # examples dropped by min_sample_len or dataset_exact_deduplication
    note: str = ""  # where the data came from (prepared cache) or went

    def add(self, other: "PrepareStats") -> None:
        self.rows.update(other.rows)
        for name in ("truncated", "no_trainable_tokens", "tokens", "label_tokens", "bad_rows", "hook_skipped", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        merged = self.bad_examples + other.bad_examples
        self.bad_examples = merged if len(merged) <= 20 else merged[:19] + merged[-1:]

    def bad(self, where: str, why: str) -> None:
        self.bad_rows += 1
        line = f"{where}: {why}"
        if len(self.bad_examples) < 20:
            self.bad_examples.append(line)
        else:  # keep the last one too: a file cut off is reported at its end
            self.bad_examples[-1] = line

    def summary(self) -> str:
        sources = ", ".join(f"{path}: {n} rows" for path, n in self.rows.items())
        share = self.label_tokens / max(self.tokens, 1)
        text = (
            f"{sources}; {self.tokens:,} tokens, {share:.0%} trained on; "
            f"{self.truncated} truncated to sequence_len, {self.no_trainable_tokens} skipped with no response token left"
        )
        if self.bad_rows:
            text += f"; {self.bad_rows} bad rows skipped (first: {self.bad_examples[0]}"
            text += f"; last: {self.bad_examples[-1]})" if self.bad_rows > 1 else ")"
        if self.hook_skipped:
            text += f"; {self.hook_skipped} rows skipped by the type hook"
        if self.dropped:
            text += f"; {self.dropped} dropped as too short (min_sample_len) or duplicates (dataset_exact_deduplication)"
        if self.note:
            text += f"; {self.note}"
        return text

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("truncated", "no_trainable_tokens", "tokens", "label_tokens", "bad_rows", "bad_examples", "hook_skipped", "dropped")}
        out["rows"] = dict(self.rows)
        return out

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "PrepareStats":
        stats = cls(**{k: v for k, v in value.items() if k != "rows"})
        stats.rows = Counter(value.get("rows", {}))
        return stats


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    stats: PrepareStats


# How a bad row is fixed: the end of every row error while preparing data.
ROW_FIX = "fix the row, or set skip_bad_rows: true to skip and count such rows"


def trained_token_mask(offsets: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens overlap a trained character span: transformers' rule for ``return_assistant_tokens_mask``.

    transformers walks tokens and sorted spans once and marks a token when it ends after the start
    of the first span that ends after the token's start; a binary search per token is the same rule.
    """
    tokens = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if not spans:
        return np.zeros(len(tokens), dtype=bool)
    starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((e for _, e in spans), dtype=np.int64, count=len(spans))
    index = np.searchsorted(ends, tokens[:, 0], side="right")
    inside = index < len(spans)
    mask = np.zeros(len(tokens), dtype=bool)
    mask[inside] = tokens[inside, 1] > starts[index[inside]]
    return mask


def read_good_rows(rows: list[tuple[dict[str, Any] | None, str, str | None]], read: Callable[[dict[str, Any], str], Any],
                   skip_bad_rows: bool, stats: "PrepareStats") -> Iterator[tuple[str, Any]]:
    """``(where, read(values, where))`` for each row, in order. A bad row (one the reader could not parse, or one
    `read` refuses with an LmforgeError) stops the run with ROW_FIX as its fix, or with skip_bad_rows is counted
    in `stats` and skipped: the one rule every data path (text, pairs, image chats) follows."""
    for values, where, error in rows:
        try:
            if error is not None:
                raise LmforgeError(error, where=where)
            result = read(values or {}, where)
        except LmforgeError as exc:
            if not skip_bad_rows:
                exc.fix = exc.fix or ROW_FIX
                raise
            stats.bad(where, exc.message)
            continue
        yield where, result
