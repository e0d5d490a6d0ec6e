"""Micro-batches over epochs with a resumable position.

The batch order is a pure function of (seed, epoch) (lmforge.data.batching), so a position is
just (epoch, batches consumed in it): a resumed run skips to it and sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lmforge.data.batching import Batch, iterate_batches


class EpochStream:
    def __init__(
        self, examples: Sequence[Any], batch_size: int, pad_token_id: int, seed: int, group_by_length: bool,
        epoch: int = 0, consumed: int = 0, sequence_len: int | None = None,
    ) -> None:
        self.examples, self.batch_size, self.pad_token_id = examples, batch_size, pad_token_id
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.consumed = epoch, consumed
        self.sequence_len = sequence_len  # set: sample packing into rows of this many tokens

    def __iter__(self) -> Iterator[Batch]:
        while self.examples:
            epoch_batches = iterate_batches(
                self.examples, self.batch_size, self.pad_token_id, self.seed, self.epoch, self.group_by_length,
                skip=self.consumed, sequence_len=self.sequence_len,
            )
            for batch in epoch_batches:
                self.consumed += 1  # counted when handed out: at a step boundary this is exact
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.consumed}
