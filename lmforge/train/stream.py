"""Micro-batches over epochs with a resumable position.

The batch order is a pure function of (seed, epoch) (lmforge.data.batching for examples,
TokenWindows.set_epoch for pretraining windows), so a position is just the epoch and how far
into it the run got: a resumed run skips there and sees the same batches. Every stream a
training recipe hands the shared setup has ``position()`` and ``restore(position)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from lmforge.data.batching import Batch, batch_order, collate, collate_packed, packed_batch_order, pad_batch


class ResumableStream(Protocol):
    """Micro-batches forever (epoch after epoch), with a position a checkpoint stores."""

    def __iter__(self) -> Iterator[Batch]: ...

    def position(self) -> dict[str, int]: ...

    def restore(self, position: dict[str, int]) -> None: ...


def deal(items: Iterator[tuple[dict[str, int], Any]], rank: int, world_size: int) -> Iterator[tuple[dict[str, int], Any]]:
    """This rank's share of one global sequence of micro-batches: of each `world_size` consecutive items,
    the rank-th, with the position after the whole group.

    Every rank walks the same global order (the one a single process sees), so a step of k
    micro-batches per rank covers the same k·world_size micro-batches as one process accumulating
    k·world_size, and at every step boundary all ranks hold the same position.
    """
    while True:
        group = list(itertools.islice(items, world_size))
        if len(group) < world_size:
            return
        yield group[-1][0], group[rank][1]


class EpochStream:
    """Padded (or packed) batches of prepared examples; position = epoch and batches consumed in it
    (counted over all ranks: the same on each at a step boundary)."""

    def __init__(
        self, examples: Sequence[Any], batch_size: int, pad_token_id: int, seed: int, group_by_length: bool,
        epoch: int = 0, consumed: int = 0, sequence_len: int | None = None, pad_to: int | None = None,
        rank: int = 0, world_size: int = 1, collate_fn: Callable[[list[Any], int], Batch] | None = None,
    ) -> None:
        self.examples, self.batch_size, self.pad_token_id = examples, batch_size, pad_token_id
        self.collate = collate_fn or collate  # another kind of example (preference pairs) brings its own
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.consumed = epoch, consumed
        self.sequence_len = sequence_len  # set: sample packing into rows of this many tokens
        self.pad_to = pad_to  # set: every batch padded to this many tokens (pad_to_sequence_len)
        self.rank, self.world_size = rank, world_size

    def _items(self) -> Iterator[tuple[dict[str, int], Any]]:
        """(position after it, example indices) of every micro-batch from the current position on, epoch after epoch."""
        lengths = [len(e) for e in self.examples]
        epoch, consumed = self.epoch, self.consumed
        while True:
            if self.sequence_len is not None:
                order: list[Any] = packed_batch_order(lengths, self.batch_size, self.sequence_len, self.seed, epoch)
            else:
                order = batch_order(lengths, self.batch_size, self.seed, epoch, self.group_by_length)
            for i in range(consumed, len(order)):
                yield {"epoch": epoch, "batches_consumed": i + 1}, order[i]
            epoch, consumed = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        if not self.examples:
            return
        for position, picked in deal(self._items(), self.rank, self.world_size):
            # counted when handed out: at a step boundary this is exact
            self.epoch, self.consumed = position["epoch"], position["batches_consumed"]
            if self.sequence_len is not None:
                batch = collate_packed([[self.examples[i] for i in row] for row in picked], self.pad_token_id)
            else:
                batch = self.collate([self.examples[i] for i in picked], self.pad_token_id)
            yield pad_batch(batch, self.pad_to, self.pad_token_id) if self.pad_to else batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.consumed}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.consumed = int(position["epoch"]), int(position["batches_consumed"])


class WindowStream:
    """Batches of pretraining token windows; position = epoch and windows consumed in it (over all ranks).

    `windows` is a TokenWindows (re-cut and re-ordered by ``set_epoch``); `collate(windows, key)`
    makes the batch, `key` = (epoch, first window) seeding anything random in it (MLM masks), so a
    resumed run draws the same masks too, on any number of ranks.
    """

    def __init__(self, windows: Any, batch_size: int, collate: Callable[[list[Any], tuple[int, int]], Batch],
                 rank: int = 0, world_size: int = 1) -> None:
        self.windows, self.batch_size, self.collate = windows, batch_size, collate
        self.epoch, self.consumed = 0, 0
        self.rank, self.world_size = rank, world_size

    def _items(self) -> Iterator[tuple[dict[str, int], Any]]:
        epoch, consumed = self.epoch, self.consumed
        while True:
            self.windows.set_epoch(epoch)
            total = len(self.windows)
            for start in range(consumed, total, self.batch_size):
                end = min(start + self.batch_size, total)
                # The windows are read here (a memory-mapped slice each), so a group may span two epochs.
                yield {"epoch": epoch, "windows_consumed": end}, ([self.windows[i] for i in range(start, end)], (epoch, start))
            epoch, consumed = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        self.windows.set_epoch(self.epoch)
        if not len(self.windows):
            return
        for position, (windows, key) in deal(self._items(), self.rank, self.world_size):
            self.epoch, self.consumed = position["epoch"], position["windows_consumed"]
            yield self.collate(windows, key)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "windows_consumed": self.consumed}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.consumed = int(position["epoch"]), int(position["windows_consumed"])
