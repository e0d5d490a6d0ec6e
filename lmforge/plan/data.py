"""The run's data as the planner sees it: token counts, and the exact micro-batches training will meet.

Counting tokens needs the tokenizer, not the weights. A GGUF file carries its tokenizer; when no
training run has converted it yet, the tokenizer is read from the GGUF header alone and saved
next to lmforge's cache, so the one tokenizer loader (models.load.config_tokenizer, as training
uses it) reads it like any other folder.

Batch order is a pure function of the seed and the epoch (data.batching), so the planner walks the
same batches the run will and finds the one that needs the most memory: no guess about padding,
packing or how many positions carry a label.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import LmforgeConfig
from lmforge.errors import LmforgeError
from lmforge.plan.memory import Batch


@dataclass
class DataStats:
    examples: int
    tokens: int  # real tokens per epoch (after truncation)
    labelled: int  # positions with a label per epoch
    max_len: int
    micro_batches_per_epoch: int
    rows_per_epoch: int  # packed rows when sample_packing, else examples
    padded_tokens_per_epoch: int  # rows x width summed over batches (what the device computes)
    candidates: list[Batch]  # the run's biggest micro-batches (memory is evaluated on each)
    batches_walked: int
    truncated: int
    summary: str
    lengths: list[int] = field(default_factory=list, repr=False)  # per training example (after truncation)
    labelled_counts: list[int] = field(default_factory=list, repr=False)
    micro_batches: int = 0  # what the run draws

    @property
    def mean_row_len(self) -> float:
        return self.tokens / max(self.rows_per_epoch, 1)

    def candidates_for(self, micro_batch_size: int, sequence_len: int, packing: bool, seed: int, group_by_length: bool,
                       micro_batches: int) -> list[Batch]:
        """The run's biggest micro-batches under another batch geometry (what-if), from the same examples.

        A shorter sequence_len truncates from the end, where the trained response is.
        """
        lengths = [min(n, sequence_len) for n in self.lengths]
        labelled = [max(0, lab - (n - cut)) for n, cut, lab in zip(self.lengths, lengths, self.labelled_counts)]
        return run_batches(lengths, labelled, micro_batch_size, seed, group_by_length, micro_batches,
                           sequence_len if packing else None)[0]


def _gguf_tokenizer_dir(gguf: Path) -> Path:
    from lmforge.models.load import cache_root

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "plan-tokenizers" / f"{gguf.stem}-{key}"


def tokenizer_without_weights(cfg: LmforgeConfig) -> Any:
    """The training tokenizer (special tokens included) without reading any weights."""
    from lmforge.atomic import atomic_dir
    from lmforge.models.load import gguf_cache_dir, config_tokenizer, load_tokenizer, resolve_model_path

    source = cfg.model.tokenizer_config or cfg.model.base_model
    path = resolve_model_path(source) if source else ""
    if path and not os.path.exists(path):  # a Hub id
        with hub_offline_unless_reachable():
            return config_tokenizer(cfg)
    if path.endswith(".gguf") and os.path.isfile(path) and not (gguf_cache_dir(Path(path)) / "config.json").exists():
        folder = _gguf_tokenizer_dir(Path(path))
        if not (folder / "tokenizer_config.json").exists():
            tokenizer = load_tokenizer(path, from_gguf=True)
            atomic_dir(folder, tokenizer.save_pretrained)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tokenizer_config": str(folder)})})
    return config_tokenizer(cfg)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers a TCP connection within `timeout` seconds."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable() -> Iterator[None]:
    """Hub offline mode while the Hub cannot be reached: a cached tokenizer loads at once, a missing one fails
    at once, instead of huggingface_hub retrying for half a minute (plan is asked about Hub ids offline)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def label_count(labels: Sequence[int]) -> int:
    """Positions that produce a loss term: labels after the first (train/loss.py shifts by one)."""
    return sum(1 for x in labels[1:] if x != -100)


def run_batches(lengths: Sequence[int], labelled: Sequence[int], micro_batch_size: int, seed: int, group_by_length: bool,
                micro_batches: int, sequence_len: int | None) -> tuple[list[Batch], int, int, int]:
    """The geometry of the first `micro_batches` micro-batches training draws, epoch after epoch.

    Returns (the candidate batches for the peak, batches walked, micro-batches per epoch, padded tokens of epoch 0).
    """
    from lmforge.data.batching import batch_order, packed_batch_order

    seen: dict[tuple[int, int, int, bool], int] = {}
    walked, epoch, per_epoch, padded_epoch0 = 0, 0, 0, 0
    while walked < micro_batches:
        if sequence_len is not None:
            order = packed_batch_order(lengths, micro_batch_size, sequence_len, seed, epoch)
            geometry = []
            for rows in order:
                row_lens = [sum(lengths[i] for i in row) for row in rows]
                width = max(row_lens)
                geometry.append((len(rows), width, sum(labelled[i] for row in rows for i in row), True))
        else:
            order = batch_order(lengths, micro_batch_size, seed, epoch, group_by_length)
            geometry = []
            for idx in order:
                row_lens = [lengths[i] for i in idx]
                width = max(row_lens)
                geometry.append((len(idx), width, sum(labelled[i] for i in idx), min(row_lens) < width))
        if not geometry:
            break
        if epoch == 0:
            per_epoch = len(geometry)
            padded_epoch0 = sum(r * w for r, w, _, _ in geometry)
        for g in geometry[: micro_batches - walked]:
            seen[g] = seen.get(g, 0) + 1
        walked += min(len(geometry), micro_batches - walked)
        epoch += 1
    # Memory grows with tokens, labelled positions and mask width: keep the batches that lead on any.
    keys = list(seen)
    picks = set(sorted(keys, key=lambda g: (g[0] * g[1], g[2]))[-8:]) | set(sorted(keys, key=lambda g: (g[2], g[0] * g[1]))[-8:])
    picks |= set(sorted(keys, key=lambda g: (g[1], g[0] * g[1]))[-4:])
    return [Batch(r, w, n, m, "data") for r, w, n, m in sorted(picks)], walked, per_epoch, padded_epoch0


def run_steps(cfg: LmforgeConfig, rows: int) -> int:
    """Optimizer steps of the run for `rows` training rows: the rule recipes/run.py's count_steps applies."""
    t = cfg.training
    per_epoch = max(1, math.ceil(math.ceil(rows / t.micro_batch_size) / t.gradient_accumulation_steps))
    return t.max_steps or max(1, math.ceil(per_epoch * t.num_epochs))


def data_stats(cfg: LmforgeConfig, micro_batches: int | None = None, tokenizer: Any = None, prepared: Any = None) -> DataStats:
    """Tokenize the training data (cached like `lmforge preprocess`) and walk the run's batches.

    `micro_batches`: how many the run draws (optimizer steps x gradient accumulation); by default
    what num_epochs / max_steps give. `prepared`: the recipe's PreparedData, when it has it already.
    """
    from lmforge.data.batching import packing_efficiency
    from lmforge.data.prepare import prepare

    if prepared is None:
        if cfg.data.datasets is None:
            raise LmforgeError("planning from the data needs `datasets`", where="datasets",
                               fix="pretraining configs are planned without data statistics (assumed full rows)")
        tokenizer = tokenizer or tokenizer_without_weights(cfg)
        processor = None
        if cfg.model.processor_type:  # image chats: the image tokens each example holds are counted in its length
            from lmforge.models.load import config_processor

            processor = config_processor(cfg, tokenizer)
        prepared = prepare(cfg.data, tokenizer, cfg.training.seed, processor=processor)
    t = cfg.training
    lengths = [len(e) for e in prepared.train]
    if not lengths:
        raise LmforgeError("no training examples", where="datasets", fix="check the dataset paths and formats")
    labelled = [label_count(e.labels) for e in prepared.train]
    packing = cfg.data.sample_packing
    seq = cfg.data.sequence_len
    rows = packing_efficiency(lengths, seq, t.seed)[1] if packing else len(lengths)
    if micro_batches is None:
        micro_batches = run_steps(cfg, rows) * t.gradient_accumulation_steps
    candidates, walked, per_epoch, padded = run_batches(lengths, labelled, t.micro_batch_size, t.seed, t.group_by_length,
                                                        micro_batches, seq if packing else None)
    return DataStats(
        examples=len(lengths), tokens=sum(lengths), labelled=sum(labelled), max_len=max(lengths),
        micro_batches_per_epoch=per_epoch, rows_per_epoch=rows, padded_tokens_per_epoch=padded,
        candidates=candidates, batches_walked=walked, truncated=prepared.stats.truncated, summary=prepared.stats.summary(),
        lengths=lengths, labelled_counts=labelled, micro_batches=micro_batches,
    )
