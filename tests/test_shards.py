"""Token shards: exact content, resume after an interruption, bounded pieces, training windows."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.shards import TokenWindows, iter_shard_tokens, read_index, write_shards
from lmforge.errors import LmforgeError

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data/tinyshakespeare/input.txt"

# Small batches and shards so a ~1 MB corpus makes many shards (and many commit points).
SMALL = {"shard_tokens": 20_000, "batch_bytes": 16_384, "piece_bytes": 4096}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lmforge.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(SHAKESPEARE)], str(out), vocab_size=1000, held_out_fraction=0)
    return str(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Tiny Shakespeare cut into 30 files of uneven size, plus awkward ones."""
    out = tmp_path_factory.mktemp("corpus")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cuts = np.linspace(0, len(text), 31).astype(int)
    files = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        files.append(out / f"part_{i:02d}.txt")
        files[-1].write_text(text[a + i * 7:b], encoding="utf-8")  # uneven: skip a few chars each
    (out / "part_30_empty.txt").write_text("")
    # One 100 kB line of multi-byte characters: cut into pieces between characters, never inside one.
    (out / "part_31_longline.txt").write_text("Grüße, Verona! ☃ " * 6000, encoding="utf-8")
    files += [out / "part_30_empty.txt", out / "part_31_longline.txt"]
    return [str(f) for f in files]


def _tokens(out_dir: Path) -> np.ndarray:
    return np.concatenate(list(iter_shard_tokens(str(out_dir))))


def _documents(ids: np.ndarray, bos: int, eos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(ids == bos)
    ends = np.flatnonzero(ids == eos)
    assert len(starts) == len(ends) and (starts < ends).all()
    return [ids[s + 1:e] for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def reference(tokenizer_dir: str, corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    out = tmp_path_factory.mktemp("ref")
    write_shards(corpus, tokenizer_dir, str(out), processes=1, **SMALL)
    return _tokens(out)


def test_shards_hold_every_document_exactly(tokenizer_dir: str, corpus: list[str], reference: np.ndarray,
                                            tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = _documents(reference, tok.bos_token_id, tok.eos_token_id)
    nonempty = [f for f in corpus if os.path.getsize(f)]
    assert len(docs) == len(nonempty) == 31  # the empty file is no document
    for ids, path in zip(docs, nonempty):
        assert tok.decode(ids) == Path(path).read_text(encoding="utf-8")
    # Pieces are cut at line ends; for this byte-level BPE that gives whole-document tokens.
    first = tok.encode(Path(nonempty[0]).read_text(encoding="utf-8"), add_special_tokens=False)
    assert docs[0].tolist() == first
    assert reference.dtype == np.uint16


def test_index_records_counts(tokenizer_dir: str, corpus: list[str], tmp_path: Path) -> None:
    report = write_shards(corpus, tokenizer_dir, str(tmp_path), processes=1, **SMALL)
    index = read_index(str(tmp_path))
    assert index["complete"] and index["dtype"] == "uint16" and index["state"]["docs"] == 31
    assert len(index["tokenizer_hash"]) == 64
    assert report.shards == len(index["shards"]) > 10
    assert sum(s["tokens"] for s in index["shards"]) == index["total_tokens"] == report.total_tokens
    for s in index["shards"]:
        assert (tmp_path / s["file"]).stat().st_size == 2 * s["tokens"]
    # A completed run is returned as is, not redone.
    again = write_shards(corpus, tokenizer_dir, str(tmp_path), processes=1, **SMALL)
    assert again.resumed and again.new_tokens == 0 and again.total_tokens == report.total_tokens


def test_worker_processes_give_the_same_tokens(tokenizer_dir: str, corpus: list[str], reference: np.ndarray,
                                               tmp_path: Path) -> None:
    write_shards(corpus, tokenizer_dir, str(tmp_path), processes=2, **SMALL)
    assert np.array_equal(_tokens(tmp_path), reference)


class _Crash(Exception):
    pass


def test_resume_after_failure_matches_uninterrupted_run(tokenizer_dir: str, corpus: list[str],
                                                        reference: np.ndarray, tmp_path: Path) -> None:
    def crash_after_3(entry: dict) -> None:
        if entry["file"] == "shard_00002.bin":
            raise _Crash

    with pytest.raises(_Crash):
        write_shards(corpus, tokenizer_dir, str(tmp_path), processes=1, on_shard=crash_after_3, **SMALL)
    index = read_index(str(tmp_path))
    assert len(index["shards"]) == 3 and not index["complete"]
    # A crash between a shard's rename and the index update leaves a shard the index does not list;
    # a crash mid-write leaves a temp file. Both must be discarded, not counted.
    (tmp_path / "shard_00003.bin").write_bytes(b"\x07\x00" * 999)
    (tmp_path / "shard_00004.bin.tmp").write_bytes(b"\x07\x00" * 5)
    report = write_shards(corpus, tokenizer_dir, str(tmp_path), processes=1, **SMALL)
    assert report.resumed and report.new_tokens == len(reference) - sum(s["tokens"] for s in index["shards"])
    assert np.array_equal(_tokens(tmp_path), reference)
    assert read_index(str(tmp_path))["state"]["docs"] == 31
    assert not list(tmp_path.glob("*.tmp"))


CHILD = """
import sys, time
from lmforge.data.shards import write_shards
def slow(entry):
    time.sleep(0.05)  # widen the window so the kill lands at a random point mid-run
if __name__ == "__main__":
    files = sys.argv[3:]
    write_shards(files, sys.argv[1], sys.argv[2], processes=2, on_shard=slow,
                 shard_tokens=20_000, batch_bytes=16_384, piece_bytes=4096)
"""


def test_resume_after_sigkill_of_the_process_tree(tokenizer_dir: str, corpus: list[str], reference: np.ndarray,
                                                  tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "shards"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(script), tokenizer_dir, str(out), *corpus], env=env,
                             start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    committed = 0
    while time.time() < deadline and child.poll() is None:
        try:
            committed = len(json.loads((out / "index.json").read_text())["shards"])
        except (OSError, ValueError):
            committed = 0
        if committed >= 4:
            break
        time.sleep(0.02)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    os.killpg(child.pid, signal.SIGKILL)  # the main process and its tokenizer workers, mid-run
    child.wait()
    index = read_index(str(out))
    assert not index["complete"] and 4 <= len(index["shards"]) < 40
    write_shards(corpus, tokenizer_dir, str(out), processes=1, **SMALL)
    assert np.array_equal(_tokens(out), reference)


def test_iterable_source_resumes(tokenizer_dir: str, tmp_path: Path) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    docs = [{"text": para} for para in text.split("\n\n")]
    settings = {"shard_tokens": 5_000, "batch_bytes": 4096}
    write_shards(iter(docs), tokenizer_dir, str(tmp_path / "full"), **settings)

    def crash(entry: dict) -> None:
        if entry["file"] == "shard_00004.bin":
            raise _Crash

    with pytest.raises(_Crash):
        write_shards(iter(docs), tokenizer_dir, str(tmp_path / "cut"), on_shard=crash, **settings)
    report = write_shards(iter(docs), tokenizer_dir, str(tmp_path / "cut"), **settings)  # a fresh iterable
    assert report.resumed and report.documents == len(docs)
    assert np.array_equal(_tokens(tmp_path / "cut"), _tokens(tmp_path / "full"))


def test_changed_settings_or_input_refuse_to_resume(tokenizer_dir: str, corpus: list[str], tmp_path: Path) -> None:
    with pytest.raises(_Crash):
        write_shards(corpus[:3], tokenizer_dir, str(tmp_path), on_shard=lambda e: (_ for _ in ()).throw(_Crash()),
                     **SMALL)
    with pytest.raises(LmforgeError, match="shard_tokens"):
        write_shards(corpus[:3], tokenizer_dir, str(tmp_path), **{**SMALL, "shard_tokens": 999})
    with pytest.raises(LmforgeError, match="sources"):
        write_shards(corpus[:4], tokenizer_dir, str(tmp_path), **SMALL)
    report = write_shards(corpus[:4], tokenizer_dir, str(tmp_path), overwrite=True, **SMALL)
    assert not report.resumed and report.documents == 4


def test_missing_inputs_are_user_errors(tokenizer_dir: str, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="no such file"):
        write_shards(["/nonexistent.txt"], tokenizer_dir, str(tmp_path))
    with pytest.raises(LmforgeError, match="no files match"):
        write_shards([str(tmp_path / "*.nothing")], tokenizer_dir, str(tmp_path))
    with pytest.raises(LmforgeError, match="tokenizer.json"):
        write_shards([str(SHAKESPEARE)], str(tmp_path), str(tmp_path / "o"))


def test_line_documents(tokenizer_dir: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = ["first doc", "", "second doc, a bit longer", "x" * 10_000, "last"]
    (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n")
    write_shards([str(tmp_path / "docs.txt")], tokenizer_dir, str(tmp_path / "o"), doc_per="line", piece_bytes=4096)
    docs = _documents(_tokens(tmp_path / "o"), tok.bos_token_id, tok.eos_token_id)
    assert [tok.decode(d) for d in docs] == [ln for ln in lines if ln]


def test_token_windows(tokenizer_dir: str, corpus: list[str], tmp_path: Path) -> None:
    # Shakespeare only: the repetitive long-line file would make window positions ambiguous.
    write_shards(corpus[:30], tokenizer_dir, str(tmp_path), **SMALL)
    reference = _tokens(tmp_path)
    seq = 64
    train = TokenWindows(str(tmp_path), seq, "train", val_fraction=0.1, seed=0)
    val = TokenWindows(str(tmp_path), seq, "val", val_fraction=0.1)
    assert isinstance(train, torch.utils.data.Dataset)
    assert 0.85 < len(train) * seq / len(reference) < 0.9 + 1e-9
    assert 0.05 < len(val) * seq / len(reference) < 0.1 + 1e-9
    shards = list(iter_shard_tokens(str(tmp_path)))
    offsets = np.cumsum([0] + [len(s) for s in shards])

    def locate(w: torch.Tensor) -> tuple[int, int]:
        # Where a window sits: (shard, start); windows never cross a shard boundary.
        for k, s in enumerate(shards):
            hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(s, seq + 1).__eq__(w.numpy()).all(1))
            if len(hits):
                return k, int(hits[0])
        raise AssertionError("window not found in any shard")

    for i in range(0, len(val), max(1, len(val) // 10)):
        w = val[i]
        assert w.dtype == torch.long and w.shape == (seq + 1,)
        k, start = locate(w)
        assert start >= len(shards[k]) - int(np.ceil(0.1 * len(shards[k])))  # in the held-out tail
    for i in range(0, len(train), max(1, len(train) // 10)):
        k, start = locate(train[i])
        assert start + seq + 1 <= len(shards[k]) - int(np.ceil(0.1 * len(shards[k])))  # never in the tail
    # Deterministic by seed; another seed or epoch cuts and orders differently.
    again = TokenWindows(str(tmp_path), seq, "train", val_fraction=0.1, seed=0)
    other = TokenWindows(str(tmp_path), seq, "train", val_fraction=0.1, seed=1)
    assert all(torch.equal(train[i], again[i]) for i in range(20))
    assert not all(torch.equal(train[i], other[i]) for i in range(20))
    # Pickles (DataLoader workers) and batches through a DataLoader.
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone[5], train[5])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch.shape == (4, seq + 1)
    assert offsets[-1] == len(reference)
    with pytest.raises(LmforgeError, match="no val window"):
        TokenWindows(str(tmp_path), 100_000, "val")
