"""Out-of-core pretraining data: text -> token shards on disk -> training windows.

Like nanoGPT's ``train.bin``, but for inputs bigger than memory and runs that get killed.

:func:`write_shards` streams documents (text files, or any iterable of texts such as a
streaming ``datasets`` split), tokenizes them in worker processes and appends the ids to
flat shard files (``uint16`` when the vocabulary fits, else ``uint32``). Memory stays
bounded: files are read a line at a time (long lines in slices), documents are cut into
pieces of ``piece_bytes`` and at most ``2 × processes`` batches are in flight.

Commit protocol (what makes a rerun resume exactly):

1. a shard is written to ``shard_NNNNN.bin.tmp``, flushed and fsynced, then renamed to
   ``shard_NNNNN.bin``;
2. ``index.json`` is then rewritten (temp file + fsync + rename, so it is always either the
   old or the new version) with the shard appended and the *input position* it ends at:
   file number + byte offset (+ whether a document is open) or, for iterables, the number of
   items consumed. For a compressed file (``.gz``, ``.bz2``, ``.xz``, ``.zst``) the offset is
   in the decompressed stream; resuming seeks there by decompressing and discarding, which is exact.
3. Shards end only at batch boundaries, and batches are cut from the input deterministically,
   so a rerun that starts from the recorded position produces exactly the tokens an
   uninterrupted run would have put after the last committed shard. Files a killed run left
   behind (``*.tmp``, a renamed shard the index does not list) are deleted first.

Documents: for files, ``doc_per="file"`` makes each file one document; ``"line"`` makes each
non-empty line one (JSONL-style corpora). ``add_bos``/``add_eos`` wrap each document. A
long document is tokenized in pieces cut at line ends (``"file"``) or whitespace, so tokens
may differ from tokenizing it whole at those cuts; the cuts are deterministic.

:class:`TokenWindows` (a ``torch.utils.data.Dataset``) memory-maps the shards and serves
windows of ``seq_len + 1`` tokens; the last ``val_fraction`` of every shard is the held-out
split. This module imports torch only when ``TokenWindows`` is first used, so the
tokenizing worker processes stay small (~30 MB instead of ~250 MB each).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.atomic import write_json
from lmforge.data.compressed import guard, open_binary
from lmforge.data.sources import expand_paths
from lmforge.hashing import file_sha256
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    import torch

INDEX = "index.json"
INDEX_VERSION = 1
# A piece is what one tokenizer call sees. 64 KiB keeps the per-call overhead negligible
# while bounding memory for a document of any size.
PIECE_BYTES = 1 << 16
# A batch is one unit of work for a worker and the granularity of shard boundaries.
BATCH_BYTES = 1 << 20

# (text, add bos before, add eos after)
Piece = tuple[str, bool, bool]


# ----------------------------------------------------------------------------- reading


def _utf8_complete_len(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the start of the last character
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)


def _read_units(f, limit: int) -> Iterator[tuple[bytes, bool]]:
    """Lines of a binary file, long ones in slices of at most ``limit`` bytes cut between
    characters. Yields ``(bytes, ends_line)``; the file position is just after each unit."""
    while True:
        raw = f.readline(limit)
        if not raw:
            return
        if raw.endswith(b"\n"):
            yield raw, True
            continue
        keep = _utf8_complete_len(raw)
        if 0 < keep < len(raw):
            f.seek(keep - len(raw), os.SEEK_CUR)  # give back the split character
            raw = raw[:keep]
        at_eof = f.peek(1) == b"" if hasattr(f, "peek") else False
        yield raw, at_eof


def _file_batches(
    files: list[str], state: dict[str, Any], doc_per: str, piece_bytes: int, batch_bytes: int
) -> Iterator[tuple[list[Piece], dict[str, Any]]]:
    """Batches of pieces from text files, each with the input position just after it."""
    file_no, docs = state["file"], state["docs"]
    batch: list[Piece] = []
    size = 0
    for fi in range(file_no, len(files)):
        with guard(files[fi]), open_binary(files[fi]) as f:
            offset = state["offset"] if fi == file_no else 0
            doc_open = state["doc_open"] if fi == file_no else False
            f.seek(offset)
            pending: list[bytes] = []
            pending_size = 0

            def emit(eos: bool) -> None:
                nonlocal pending, pending_size, doc_open, docs, size
                text = b"".join(pending).decode("utf-8", errors="replace")
                if doc_per == "line":
                    text = text.rstrip("\r\n") if eos else text
                if text or (eos and doc_open):
                    batch.append((text, not doc_open, eos))
                    size += len(text) + 1
                    doc_open = not eos
                    docs += int(eos)
                pending, pending_size = [], 0

            for unit, ends_line in _read_units(f, piece_bytes):
                pending.append(unit)
                pending_size += len(unit)
                if doc_per == "line":
                    if ends_line:
                        emit(True)
                    elif pending_size >= piece_bytes:
                        emit(False)
                elif pending_size >= piece_bytes and ends_line:
                    emit(False)
                elif pending_size >= 4 * piece_bytes:
                    emit(False)  # no newline for a long stretch: cut between characters
                if size >= batch_bytes and not pending:
                    yield batch, {"file": fi, "offset": f.tell(), "doc_open": doc_open, "docs": docs}
                    batch, size = [], 0
            if pending or doc_open:
                emit(True)
        if size >= batch_bytes or fi == len(files) - 1:
            # End of a file is a natural batch boundary: the position is simply the next file.
            if batch:
                yield batch, {"file": fi + 1, "offset": 0, "doc_open": False, "docs": docs}
                batch, size = [], 0


def _split_text(text: str, piece_chars: int) -> list[str]:
    """Cut a long text into pieces at a newline or space near ``piece_chars``."""
    pieces = []
    while len(text) > piece_chars:
        cut = text.rfind("\n", piece_chars // 2, piece_chars)
        if cut < 0:
            cut = text.rfind(" ", piece_chars // 2, piece_chars)
        cut = piece_chars if cut < 0 else cut + 1
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return pieces


def _iterable_batches(
    source: Iterable[Any], state: dict[str, Any], text_field: str, piece_bytes: int, batch_bytes: int
) -> Iterator[tuple[list[Piece], dict[str, Any]]]:
    """Batches from an iterable of documents; the position is the number of items consumed."""
    items, docs = state["items"], state["docs"]
    if items:
        skip = getattr(source, "skip", None)
        # datasets' IterableDataset.skip skips without decoding; anything else is consumed.
        source = skip(items) if callable(skip) else itertools.islice(source, items, None)
    batch: list[Piece] = []
    size = 0
    for item in source:
        items += 1
        text = item[text_field] if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise LmforgeError(f"document {items - 1} is {type(text).__name__}, not text",
                               where=f"pretraining source (field '{text_field}')",
                               fix="yield strings or dicts with a text field (set text_field)")
        if text:
            parts = _split_text(text, piece_bytes)
            for i, part in enumerate(parts):
                batch.append((part, i == 0, i == len(parts) - 1))
                size += len(part) + 1
            docs += 1
        if size >= batch_bytes:
            yield batch, {"items": items, "docs": docs}
            batch, size = [], 0
    if batch:
        yield batch, {"items": items, "docs": docs}


# ----------------------------------------------------------------------------- tokenizing

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, bos_id: int | None, eos_id: int | None, dtype: str, threads: bool) -> None:
    if not threads:
        # Several processes each running a multi-threaded tokenizer would oversubscribe the CPUs.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_file(tokenizer_json), bos=bos_id, eos=eos_id, dtype=np.dtype(dtype))


def _encode_batch(pieces: list[Piece]) -> np.ndarray:
    tok, bos, eos = _WORKER["tok"], _WORKER["bos"], _WORKER["eos"]
    encodings = tok.encode_batch_fast([p[0] for p in pieces], add_special_tokens=False)
    out: list[list[int]] = []
    for (_, add_bos, add_eos), enc in zip(pieces, encodings):
        if add_bos and bos is not None:
            out.append([bos])
        out.append(enc.ids)
        if add_eos and eos is not None:
            out.append([eos])
    return np.fromiter(itertools.chain.from_iterable(out), dtype=_WORKER["dtype"])


# ----------------------------------------------------------------------------- writing


@dataclass
class ShardReport:
    """What :func:`write_shards` did in this call (``resumed`` when it continued a run)."""

    out_dir: str
    shards: int
    total_tokens: int
    documents: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    dtype: str
    resumed: bool


def read_index(out_dir: str) -> dict[str, Any]:
    """The shard index of ``out_dir`` (raises LmforgeError when there is none)."""
    path = Path(out_dir) / INDEX
    if not path.is_file():
        raise LmforgeError(f"no {INDEX} in {out_dir}", where=str(out_dir),
                           fix="run write_shards (lmforge pretraining preprocessing) first")
    return json.loads(path.read_text())


def write_shards(
    sources: str | Sequence[str] | Iterable[Any],
    tokenizer_dir: str,
    out_dir: str,
    processes: int = 1,
    shard_tokens: int = 100_000_000,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    doc_per: str = "file",
    text_field: str = "text",
    piece_bytes: int = PIECE_BYTES,
    batch_bytes: int = BATCH_BYTES,
    overwrite: bool = False,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> ShardReport:
    """Tokenize ``sources`` into ``out_dir/shard_NNNNN.bin`` + ``index.json``; resumes if interrupted.

    ``sources``: a path, a list of paths/globs (``**`` recursive), or an iterable of documents
    (strings, or dicts with ``text_field``, e.g. ``load_dataset(..., streaming=True)``). To
    resume an iterable, pass a fresh iterable over the same data: consumed items are skipped.
    ``processes``: tokenizer worker processes (1 = in this process, using the tokenizer's own
    threads). ``shard_tokens``: a shard is closed at the first batch boundary at or past it.
    ``overwrite``: discard an existing (complete or partial) run in ``out_dir``.
    ``on_shard``: called with each committed shard's index entry (progress display, tests).
    A completed ``out_dir`` is returned as is.

    ``processes > 1`` starts workers with multiprocessing's *spawn* method, which re-imports
    the calling script: call this from under ``if __name__ == "__main__":`` in scripts.
    """
    from lmforge.models.load import load_tokenizer  # the one tokenizer loader

    if doc_per not in ("file", "line"):
        raise LmforgeError(f"unknown doc_per '{doc_per}'", where="pretraining.doc_per", fix="use file or line")
    tok_dir = Path(tokenizer_dir)
    tok_json = tok_dir / "tokenizer.json"
    if not tok_json.is_file():
        raise LmforgeError(f"{tokenizer_dir} has no tokenizer.json (a fast tokenizer is needed)",
                           where="tokenizer", fix="train one with `lmforge tokenizer train` or save a fast tokenizer there")
    tokenizer = load_tokenizer(str(tok_dir))
    vocab_size = len(tokenizer)
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    bos_id = tokenizer.bos_token_id if add_bos else None
    eos_id = tokenizer.eos_token_id if add_eos else None
    if add_bos and bos_id is None:
        raise LmforgeError("the tokenizer has no bos token", where="tokenizer", fix="set add_bos: false or add a bos token")
    if add_eos and eos_id is None:
        raise LmforgeError("the tokenizer has no eos token", where="tokenizer", fix="set add_eos: false or add an eos token")

    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    is_files = isinstance(sources, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in sources)
    files = [os.path.abspath(f) for f in expand_paths([str(s) for s in sources], where="pretraining sources", what="file")] if is_files else []
    if is_files and not files:
        raise LmforgeError("no input files given", where="pretraining sources", fix="list text files or globs")
    settings = {
        "version": INDEX_VERSION,
        "tokenizer_hash": file_sha256(tok_json),
        "vocab_size": vocab_size,
        "dtype": dtype,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "doc_per": doc_per if is_files else "item",
        "text_field": None if is_files else text_field,
        "piece_bytes": piece_bytes,
        "batch_bytes": batch_bytes,
        "shard_tokens": shard_tokens,
        # Sizes catch an input that changed between the killed run and the rerun.
        "sources": [[f, os.path.getsize(f)] for f in files] if is_files else f"iterable:{type(sources).__name__}",
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LmforgeError(f"another write_shards is writing {out_dir}", where=str(out_dir),
                           fix="wait for it, or use another out_dir") from None
    try:
        return _write_locked(sources, files, is_files, settings, tok_json, out, processes, overwrite, on_shard)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _write_locked(
    sources: Any, files: list[str], is_files: bool, settings: dict[str, Any], tok_json: Path, out: Path,
    processes: int, overwrite: bool, on_shard: Callable[[dict[str, Any]], None] | None,
) -> ShardReport:
    index_path = out / INDEX
    index: dict[str, Any] | None = None
    if index_path.is_file() and not overwrite:
        index = json.loads(index_path.read_text())
        changed = [k for k, v in settings.items() if index.get(k) != v]
        if changed:
            raise LmforgeError(
                f"{out} holds shards made with different settings ({', '.join(changed)})",
                where=str(index_path), fix="use a new out_dir, or overwrite: true to start over",
            )
    if index is None:
        for p in out.glob("shard_*.bin*"):
            p.unlink()
        start_state = ({"file": 0, "offset": 0, "doc_open": False, "docs": 0} if is_files
                       else {"items": 0, "docs": 0})
        index = {**settings, "shards": [], "state": start_state, "total_tokens": 0, "complete": False}
        write_json(index_path, index, indent=1, durable=True)
    resumed = bool(index["shards"]) or index["complete"]
    if index["complete"]:
        return ShardReport(str(out), len(index["shards"]), index["total_tokens"], index["state"]["docs"],
                           0, 0.0, 0.0, index["dtype"], resumed)
    # Leftovers of a killed run: partial temp files and shards renamed but never indexed.
    listed = {s["file"] for s in index["shards"]}
    for p in out.glob("shard_*.bin*"):
        if p.name not in listed:
            p.unlink()

    dtype = np.dtype(settings["dtype"])
    state = index["state"]
    batches = (_file_batches(files, state, settings["doc_per"], settings["piece_bytes"], settings["batch_bytes"])
               if is_files else
               _iterable_batches(sources, state, settings["text_field"], settings["piece_bytes"], settings["batch_bytes"]))
    init_args = (str(tok_json), settings["bos_id"], settings["eos_id"], dtype.name)

    start = time.perf_counter()
    new_tokens = 0
    shard_no = len(index["shards"])
    shard_file = None
    shard_len = 0

    def commit(state_after: dict[str, Any], complete: bool) -> None:
        nonlocal shard_file, shard_len, shard_no
        if shard_file is not None:
            shard_file.flush()
            os.fsync(shard_file.fileno())
            shard_file.close()
            name = f"shard_{shard_no:05d}.bin"
            os.replace(out / (name + ".tmp"), out / name)
            entry = {"file": name, "tokens": shard_len, "docs_end": state_after["docs"]}
            index["shards"].append(entry)
            index["total_tokens"] += shard_len
            shard_no += 1
        index["state"] = state_after
        index["complete"] = complete
        write_json(index_path, index, indent=1, durable=True)
        shard_file, shard_len = None, 0
        if on_shard is not None and not complete:
            on_shard(index["shards"][-1])

    def consume(ids: np.ndarray, state_after: dict[str, Any]) -> None:
        nonlocal shard_file, shard_len, new_tokens
        if len(ids):
            if shard_file is None:
                shard_file = open(out / f"shard_{shard_no:05d}.bin.tmp", "wb")
            ids.tofile(shard_file)
            shard_len += len(ids)
            new_tokens += len(ids)
        if shard_len >= settings["shard_tokens"]:
            commit(state_after, complete=False)

    last_state = state
    if processes <= 1:
        _init_worker(*init_args, threads=True)
        for pieces, state_after in batches:
            consume(_encode_batch(pieces), state_after)
            last_state = state_after
    else:
        # spawn, not fork: a fork would copy this process (torch, transformers: hundreds of MB)
        # into every worker; spawned workers import only numpy + tokenizers.
        ctx = mp.get_context("spawn")
        with ctx.Pool(processes, initializer=_init_worker, initargs=(*init_args, False)) as pool:
            pending: deque = deque()
            # Pool.imap would read the whole input ahead of the workers; submitting by hand
            # keeps at most 2 batches per worker in memory.
            for pieces, state_after in batches:
                pending.append((pool.apply_async(_encode_batch, (pieces,)), state_after))
                if len(pending) >= 2 * processes:
                    result, st = pending.popleft()
                    consume(result.get(), st)
                    last_state = st
            while pending:
                result, st = pending.popleft()
                consume(result.get(), st)
                last_state = st
    commit(last_state, complete=True)
    seconds = time.perf_counter() - start
    return ShardReport(str(out), len(index["shards"]), index["total_tokens"], index["state"]["docs"], new_tokens,
                       round(seconds, 3), round(new_tokens / seconds, 1) if seconds else 0.0, dtype.name, resumed)


def iter_shard_tokens(out_dir: str) -> Iterator[np.ndarray]:
    """The committed shards of ``out_dir`` as read-only memory maps, in order."""
    index = read_index(out_dir)
    for s in index["shards"]:
        yield np.memmap(Path(out_dir) / s["file"], dtype=index["dtype"], mode="r", shape=(s["tokens"],))


def most_frequent_token(out_dir: str, special_ids: Sequence[int], max_tokens: int) -> int:
    """The most frequent non-special token in the first `max_tokens` of the shards (a prefix suffices):
    the masked-LM baseline that always guesses it."""
    counts = np.zeros(1, dtype=np.int64)
    seen = 0
    for shard in iter_shard_tokens(out_dir):
        part = np.asarray(shard[: max_tokens - seen]).astype(np.int64)
        c = np.bincount(part)
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
        seen += len(part)
        if seen >= max_tokens:
            break
    counts[[i for i in special_ids if i < len(counts)]] = 0  # never a masked target
    return int(counts.argmax())


# ----------------------------------------------------------------------------- windows


def _region_windows(length: int, seq_len: int, offset: int) -> int:
    # Windows of seq_len + 1 tokens with stride seq_len: consecutive windows share one token,
    # so every token in the region is a target exactly once.
    usable = length - offset - 1
    return max(0, usable // seq_len)


def _make_token_windows() -> type:
    import torch
    from torch.utils.data import Dataset

    class TokenWindows(Dataset):
        """Windows of ``seq_len + 1`` token ids from the shards of ``shards_dir``.

        ``split="train"`` covers the first ``1 - val_fraction`` of every shard, ``"val"`` the
        rest (held out by region, so the two never share a token). Train windows start at a
        seeded random phase per shard and come in a seeded permuted order (``shuffle``); both
        change with :meth:`set_epoch`. Val windows are fixed. Items are ``torch.long`` tensors.
        Shards are memory-mapped lazily, so the dataset is cheap to pickle for DataLoader workers.
        """

        def __init__(
            self,
            shards_dir: str,
            seq_len: int,
            split: str = "train",
            val_fraction: float = 0.005,
            seed: int = 0,
            shuffle: bool | None = None,
            allow_incomplete: bool = False,
        ) -> None:
            if split not in ("train", "val"):
                raise LmforgeError(f"unknown split '{split}'", where="TokenWindows", fix="use train or val")
            if not 0 <= val_fraction < 1:
                raise LmforgeError(f"val_fraction {val_fraction} out of range", where="pretraining.val_fraction",
                                   fix="use a value in [0, 1), e.g. 0.005")
            index = read_index(shards_dir)
            if not index["complete"] and not allow_incomplete:
                raise LmforgeError(f"the shards in {shards_dir} are not complete", where=str(shards_dir),
                                   fix="rerun write_shards to finish them (it resumes)")
            self.shards_dir = str(shards_dir)
            self.seq_len = seq_len
            self.split = split
            self.val_fraction = val_fraction
            self.seed = seed
            self.shuffle = (split == "train") if shuffle is None else shuffle
            self.dtype = index["dtype"]
            self.shards = [(s["file"], s["tokens"]) for s in index["shards"]]
            self._maps: dict[int, np.memmap] = {}
            self.set_epoch(0)
            if len(self) == 0:
                raise LmforgeError(
                    f"no {split} window of {seq_len + 1} tokens fits in {shards_dir}",
                    where="pretraining.sequence_len", fix="use a shorter sequence_len, more data or another val_fraction",
                )

        def _region(self, tokens: int) -> tuple[int, int]:
            val = math.ceil(tokens * self.val_fraction) if self.val_fraction else 0
            return (0, tokens - val) if self.split == "train" else (tokens - val, tokens)

        def set_epoch(self, epoch: int) -> None:
            """Re-cut and re-order the train windows for another pass (deterministic)."""
            self.epoch = epoch
            rng = np.random.default_rng([self.seed, epoch])
            starts, counts = [], []
            for _, tokens in self.shards:
                lo, hi = self._region(tokens)
                phase = int(rng.integers(self.seq_len)) if self.split == "train" and hi - lo > 2 * self.seq_len else 0
                starts.append(lo + phase)
                counts.append(_region_windows(hi - lo, self.seq_len, phase))
            self._starts = np.array(starts, dtype=np.int64)
            self._cum = np.cumsum([0, *counts]).astype(np.int64)
            n = int(self._cum[-1])
            self._order = rng.permutation(n) if self.shuffle else None

        def __len__(self) -> int:
            return int(self._cum[-1])

        def __getitem__(self, i: int) -> torch.Tensor:
            if not 0 <= i < len(self):
                raise IndexError(i)
            j = int(self._order[i]) if self._order is not None else i
            shard = int(np.searchsorted(self._cum, j, side="right")) - 1
            start = int(self._starts[shard]) + (j - int(self._cum[shard])) * self.seq_len
            if shard not in self._maps:
                file, tokens = self.shards[shard]
                self._maps[shard] = np.memmap(Path(self.shards_dir) / file, dtype=self.dtype, mode="r",
                                              shape=(tokens,))
            window = self._maps[shard][start:start + self.seq_len + 1]
            return torch.from_numpy(window.astype(np.int64))

        def __getstate__(self) -> dict[str, Any]:
            state = self.__dict__.copy()
            state["_maps"] = {}  # memmaps are reopened in each DataLoader worker
            return state

    TokenWindows.__module__ = __name__
    TokenWindows.__qualname__ = "TokenWindows"  # so pickle finds it as lmforge.data.shards.TokenWindows
    return TokenWindows


def __getattr__(name: str) -> Any:
    # Build TokenWindows (and import torch) on first use; see the module docstring for why.
    if name == "TokenWindows":
        cls = _make_token_windows()
        globals()["TokenWindows"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from torch.utils.data import Dataset as _Dataset

    class TokenWindows(_Dataset):  # noqa: F811
        def __init__(self, shards_dir: str, seq_len: int, split: str = "train", val_fraction: float = 0.005,
                     seed: int = 0, shuffle: bool | None = None, allow_incomplete: bool = False) -> None: ...
        def set_epoch(self, epoch: int) -> None: ...
        def __len__(self) -> int: ...
        def __getitem__(self, i: int) -> torch.Tensor: ...
