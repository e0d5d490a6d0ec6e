"""Benchmark: tokenize >= 1 GB of real text into shards with bounded memory.

Corpus (built on the fly in a temp dir, never committed): the Python documentation sources
from Debian's ``python3-doc`` package (``apt-get install -y python3-doc``; text under
/usr/share/doc/python3*/) plus Tiny Shakespeare (``data/tinyshakespeare/input.txt``
from the repo root), repeated into files of ``--file-mb`` MB until ``--gb`` GB is reached.
A BPE tokenizer is trained on a few MB of it first. Then :func:`write_shards` runs, while a
thread samples the resident memory (RSS) of this process and all its descendants every
0.1 s; the table reports the peak of that sum (which double-counts shared pages, so it is
an upper bound).

    nice python bench/shard_memory.py [--gb 1] [--processes 2] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data/tinyshakespeare/input.txt"
TEXT_SUFFIXES = {".txt", ".rst", ".html", ".md", ".py"}
LIMIT_BYTES = 1.5 * 2**30


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(sum of RSS over the process tree, number of processes)."""
    total, n, stack = 0, 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss(pid)
        n += 1
        stack.extend(_children(pid))
    return total, n


class PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.peak_procs = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss, n = tree_rss(os.getpid())
            if rss > self.peak:
                self.peak, self.peak_procs = rss, n
            time.sleep(self.interval)


def source_files() -> list[Path]:
    files = [p for d in sorted(Path("/usr/share/doc").glob("python3*")) for p in sorted(d.rglob("*"))
             if p.is_file() and p.suffix in TEXT_SUFFIXES]
    if SHAKESPEARE.is_file():
        files.append(SHAKESPEARE.resolve())
    if not files:
        raise SystemExit("no text found: apt-get install -y python3-doc")
    return files


def build_corpus(out: Path, target_bytes: int, file_bytes: int) -> tuple[list[Path], int, int]:
    """Concatenate the source files round-robin into files of about ``file_bytes``."""
    sources = source_files()
    unique = sum(p.stat().st_size for p in sources)
    written, k, files = 0, 0, []
    while written < target_bytes:
        path = out / f"corpus_{len(files):04d}.txt"
        with open(path, "wb") as dst:
            size = 0
            while size < file_bytes and written + size < target_bytes:
                data = sources[k % len(sources)].read_bytes()
                k += 1
                dst.write(data if data.endswith(b"\n") else data + b"\n")
                size += len(data) + 1
        written += size
        files.append(path)
    return files, written, unique


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--file-mb", type=int, default=32)
    ap.add_argument("--shard-tokens", type=int, default=50_000_000)
    ap.add_argument("--keep", help="keep the corpus and shards in this folder")
    args = ap.parse_args()

    # Imported here, not at the top: spawned tokenizer workers re-import this file.
    from lmforge.data.shards import read_index, write_shards
    from lmforge.data.tokenizer_train import train_tokenizer

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmforge-shard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        (work / "corpus").mkdir(exist_ok=True)
        files, input_bytes, unique = build_corpus(work / "corpus", int(args.gb * 2**30), args.file_mb * 2**20)
        print(f"corpus: {len(files)} files, {input_bytes / 2**30:.2f} GiB from {unique / 2**20:.1f} MiB of unique text "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        # Train on the first file only (≈ file-mb of mixed docs + Shakespeare): enough for a bench vocabulary.
        report = train_tokenizer([str(files[0])], str(work / "tokenizer"), args.vocab, "bpe", "hf")
        print(f"tokenizer: vocab {report.vocab_size}, {report.seconds:.1f} s, "
              f"{report.tokens_per_word:.3f} tokens/word on held-out text", flush=True)

        sampler = PeakSampler()
        sampler.start()
        r = write_shards([str(f) for f in files], str(work / "tokenizer"), str(work / "shards"),
                         processes=args.processes, shard_tokens=args.shard_tokens)
        sampler.stop.set()
        sampler.join()
        index = read_index(str(work / "shards"))
        assert index["complete"] and index["total_tokens"] == r.total_tokens
        rows = [
            ("input bytes", f"{input_bytes:,} ({input_bytes / 2**30:.2f} GiB)"),
            ("documents (files)", f"{r.documents:,}"),
            ("tokens", f"{r.total_tokens:,}"),
            ("shards", f"{r.shards} x ~{args.shard_tokens:,} tokens ({r.dtype})"),
            ("processes", f"{args.processes} workers + main"),
            ("seconds", f"{r.seconds:,.1f}"),
            ("tokens/s", f"{r.tokens_per_second:,.0f}"),
            ("MB/s of text", f"{input_bytes / r.seconds / 2**20:.2f}"),
            ("peak RSS, process tree", f"{sampler.peak / 2**20:,.0f} MiB over {sampler.peak_procs} processes "
                                       f"(limit {LIMIT_BYTES / 2**20:,.0f} MiB)"),
        ]
        width = max(len(k) for k, _ in rows)
        print("\n| " + "metric".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
        for k, v in rows:
            print(f"| {k.ljust(width)} | {v} |")
        if sampler.peak >= LIMIT_BYTES:
            raise SystemExit("FAIL: peak RSS over the limit")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
