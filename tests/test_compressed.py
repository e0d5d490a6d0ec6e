"""Compressed data files (.gz, .bz2, .xz, .zst) read as if they were not: datasets, validate, pretraining shards."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ARITHMETIC, REPO, tiny_config, write_config
from lmforge.data.shards import iter_shard_tokens, read_index, write_shards
from lmforge.data.sources import read_rows
from lmforge.errors import LmforgeError

SHAKESPEARE = REPO / "data/tinyshakespeare/input.txt"


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data, mtime=0)
    if suffix == ".bz2":
        return bz2.compress(data)
    if suffix == ".xz":
        return lzma.compress(data)
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _plain_files(folder: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ARITHMETIC[:6]
    files = {
        "jsonl": folder / "d.jsonl", "json": folder / "d.json", "csv": folder / "d.csv",
        "parquet": folder / "d.parquet", "text": folder / "d.txt",
    }
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["json"].write_text(json.dumps(rows))
    files["csv"].write_text("instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), files["parquet"])
    files["text"].write_text("".join(r["output"] + "\n" for r in rows))
    return files


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_every_file_type_reads_the_same_compressed(suffix: str, tmp_path: Path) -> None:
    for kind, plain in _plain_files(tmp_path).items():
        packed = plain.with_name(plain.name + suffix)
        packed.write_bytes(compress(plain.read_bytes(), suffix))
        expected = [r.values for r in read_rows(str(plain))]
        got = [r.values for r in read_rows(str(packed))]
        assert got == expected and len(got) == 6, kind
        # ds_type says the type when the name does not; the compression still comes from the name
        assert [r.values for r in read_rows(str(packed), ds_type=kind)] == expected


def test_a_folder_of_compressed_files_is_read(tmp_path: Path) -> None:
    for i, suffix in enumerate([".gz", ".zst"]):
        (tmp_path / f"part{i}.jsonl{suffix}").write_bytes(compress(json.dumps(ARITHMETIC[i]).encode() + b"\n", suffix))
    assert [r.values for r in read_rows(str(tmp_path))] == ARITHMETIC[:2]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_a_damaged_compressed_file_is_named(suffix: str, tmp_path: Path) -> None:
    packed = tmp_path / f"d.jsonl{suffix}"
    data = compress("".join(json.dumps(r) + "\n" for r in ARITHMETIC).encode(), suffix)
    packed.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmforgeError, match="damaged or cut off") as caught:
        list(read_rows(str(packed)))
    assert caught.value.where == str(packed)


def test_a_compressed_file_without_its_suffix_says_so(tmp_path: Path) -> None:
    hidden = tmp_path / "d.jsonl"
    hidden.write_bytes(gzip.compress(b'{"text": "hi"}\n'))
    with pytest.raises(LmforgeError, match="gzip-compressed") as caught:
        [r.check() for r in read_rows(str(hidden))]
    assert caught.value.where == f"{hidden}:1"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_validate_and_preprocess_read_gzipped_jsonl(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl.gz"
    data.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ARITHMETIC).encode()))
    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, data, tmp_path / "out", dataset_prepared_path=str(tmp_path / "prep")))
    proc = _run("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{data}: {len(ARITHMETIC)} rows" in proc.stderr
    proc = _run("preprocess", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(ARITHMETIC)} train / 0 eval examples" in proc.stderr + proc.stdout
    # a damaged one: one line naming the file, exit 2
    data.write_bytes(data.read_bytes()[:40])
    proc = _run("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {data}: the gzip file is damaged or cut off" in proc.stderr


def test_validate_reads_compressed_pretraining_text_through(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt.xz"
    text.write_bytes(lzma.compress(SHAKESPEARE.read_bytes()[:20_000]))
    config = {"base_model": str(tiny_model_dir), "pretraining_dataset": [{"path": str(text)}], "sequence_len": 32,
              "max_steps": 1, "output_dir": str(tmp_path / "out")}
    path = write_config(tmp_path / "c.yml", config)
    assert _run("validate", str(path), cwd=tmp_path).returncode == 0
    text.write_bytes(text.read_bytes()[:-100])
    proc = _run("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and f"error: {text}: the xz file is damaged or cut off" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lmforge.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(SHAKESPEARE)], str(out), vocab_size=600, held_out_fraction=0)
    return str(out)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_shards_from_compressed_text_resume_exactly(suffix: str, tokenizer_dir: str, tmp_path: Path) -> None:
    """The shard writer records byte offsets of the decompressed stream; a rerun after a crash seeks there
    (decompressing and discarding) and ends with exactly the tokens of an uninterrupted run on the plain text."""
    source = SHAKESPEARE.read_bytes()[:300_000]
    plain = tmp_path / "plain" / "corpus.txt"
    plain.parent.mkdir()
    plain.write_bytes(source)
    packed = tmp_path / f"corpus.txt{suffix}"
    packed.write_bytes(compress(source, suffix))
    small = {"shard_tokens": 8_000, "batch_bytes": 8_192, "piece_bytes": 2048, "doc_per": "line"}
    write_shards([str(plain)], tokenizer_dir, str(tmp_path / "ref"), **small)
    reference = np.concatenate(list(iter_shard_tokens(str(tmp_path / "ref"))))

    committed = []

    def crash_after_3(entry: dict) -> None:
        committed.append(entry)
        if len(committed) == 3:
            raise _Crash

    with pytest.raises(_Crash):
        write_shards([str(packed)], tokenizer_dir, str(tmp_path / "cut"), on_shard=crash_after_3, **small)
    state = read_index(str(tmp_path / "cut"))["state"]
    assert 0 < state["offset"] < len(source)  # an offset in the decompressed text
    report = write_shards([str(packed)], tokenizer_dir, str(tmp_path / "cut"), **small)
    assert report.resumed
    assert np.array_equal(np.concatenate(list(iter_shard_tokens(str(tmp_path / "cut")))), reference)
