"""Micro-batches over epochs with a resumable position.

The batch order is a pure function of (seed, epoch) (lmforge.data.batching for examples,
TokenWindows.set_epoch for pretraining windows), so a position is just the epoch and how far
into it the run got: a resumed run skips there and sees the same batches. Every stream a
training recipe hands the shared setup has ``position()`` and ``restore(position)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from lmforge.data.batching import Batch, iterate_batches, pad_batch


class ResumableStream(Protocol):
    """Micro-batches forever (epoch after epoch), with a position a checkpoint stores."""

    def __iter__(self) -> Iterator[Batch]: ...

    def position(self) -> dict[str, int]: ...

    def restore(self, position: dict[str, int]) -> None: ...


class EpochStream:
    """Padded (or packed) batches of prepared examples; position = epoch and batches consumed in it."""

    def __init__(
        self, examples: Sequence[Any], batch_size: int, pad_token_id: int, seed: int, group_by_length: bool,
        epoch: int = 0, consumed: int = 0, sequence_len: int | None = None, pad_to: int | None = None,
    ) -> None:
        self.examples, self.batch_size, self.pad_token_id = examples, batch_size, pad_token_id
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.consumed = epoch, consumed
        self.sequence_len = sequence_len  # set: sample packing into rows of this many tokens
        self.pad_to = pad_to  # set: every batch padded to this many tokens (pad_to_sequence_len)

    def __iter__(self) -> Iterator[Batch]:
        while self.examples:
            epoch_batches = iterate_batches(
                self.examples, self.batch_size, self.pad_token_id, self.seed, self.epoch, self.group_by_length,
                skip=self.consumed, sequence_len=self.sequence_len,
            )
            for batch in epoch_batches:
                self.consumed += 1  # counted when handed out: at a step boundary this is exact
                yield pad_batch(batch, self.pad_to, self.pad_token_id) if self.pad_to else batch
            self.epoch, self.consumed = self.epoch + 1, 0

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.consumed}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.consumed = int(position["epoch"]), int(position["batches_consumed"])


class WindowStream:
    """Batches of pretraining token windows; position = epoch and windows consumed in it.

    `windows` is a TokenWindows (re-cut and re-ordered by ``set_epoch``); `collate(windows, key)`
    makes the batch, `key` = (epoch, first window) seeding anything random in it (MLM masks), so a
    resumed run draws the same masks too.
    """

    def __init__(self, windows: Any, batch_size: int, collate: Callable[[list[Any], tuple[int, int]], Batch]) -> None:
        self.windows, self.batch_size, self.collate = windows, batch_size, collate
        self.epoch, self.consumed = 0, 0

    def __iter__(self) -> Iterator[Batch]:
        while len(self.windows):
            self.windows.set_epoch(self.epoch)
            total = len(self.windows)
            while self.consumed < total:
                start, end = self.consumed, min(self.consumed + self.batch_size, total)
                self.consumed = end  # counted when handed out: at a step boundary this is exact
                yield self.collate([self.windows[i] for i in range(start, end)], (self.epoch, start))
            self.epoch, self.consumed = self.epoch + 1, 0

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "windows_consumed": self.consumed}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.consumed = int(position["epoch"]), int(position["windows_consumed"])
