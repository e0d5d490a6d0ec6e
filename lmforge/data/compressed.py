"""Compressed data files (``.gz``, ``.bz2``, ``.xz``, ``.zst``), read as if they were not.

As in ``datasets``, the compression comes from the last suffix and the file type from the one
under it: ``train.jsonl.gz`` is gzipped JSONL. :func:`open_binary` returns the decompressed
byte stream with ``tell``/``seek``/``peek``/``readline``, so a reader that records a byte offset
(the pretraining shard writer) resumes at the same offset of the decompressed stream: seeking
forward decompresses and discards, which is exact. A damaged or cut-off file raises one
:class:`LmforgeError` naming it (:func:`guard`), never a codec's own exception.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

from lmforge.errors import LmforgeError

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
T = TypeVar("T")


def compression(path: str | Path) -> str | None:
    """``gzip``, ``bz2``, ``xz`` or ``zstd`` when the name ends in a compression suffix, else None."""
    return COMPRESSIONS.get(Path(path).suffix.lower())


def data_suffix(path: str | Path) -> str:
    """The suffix that says the file type, under any compression suffix: ``a.jsonl.gz`` → ``.jsonl``."""
    path = Path(path)
    if compression(path):
        path = path.with_suffix("")
    return path.suffix.lower()


class _ZstdRaw(io.RawIOBase):
    """A .zst file's decompressed bytes (every frame), with tell and seek (forward: decompress and discard;
    back: start over). zstandard's own stream reader ends quietly where a file is cut off inside a
    frame; this one raises, so a truncated file is never read as a shorter one."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._zstd = zstandard
        self._path = path
        self._start()

    def _start(self) -> None:
        self._file = open(self._path, "rb")
        self._decompressor = self._zstd.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._pending = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise self._zstd.ZstdError("the file ends inside a zstd frame")
                return 0
            while chunk:
                self._pending += self._decompressor.decompress(chunk)
                self._in_frame = not self._decompressor.eof
                chunk = self._decompressor.unused_data if self._decompressor.eof else b""
                if self._decompressor.eof:  # a frame ended: the next one (if any) needs a fresh decompressor
                    self._decompressor = self._zstd.ZstdDecompressor().decompressobj()
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        self._pos += size
        return size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._pos + offset if whence == io.SEEK_CUR else None
        if target is None or target < 0:
            raise io.UnsupportedOperation("seek to the end of a compressed stream")
        if target < self._pos:
            self._file.close()
            self._start()
        scratch = bytearray(1 << 16)
        while self._pos < target:
            if not self.readinto(memoryview(scratch)[: min(len(scratch), target - self._pos)]):
                break
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def _zstd_reader(path: Path) -> IO[bytes]:
    try:
        import zstandard  # noqa: F401
    except ImportError as exc:  # pinned in pyproject; said plainly where an install lacks it
        raise LmforgeError("reading .zst files needs the zstandard package", where=str(path),
                           fix="pip install zstandard") from exc
    return io.BufferedReader(_ZstdRaw(path))  # readline and peek on top


def open_binary(path: str | Path) -> IO[bytes]:
    """The file's bytes, decompressed when its name says it is compressed."""
    path = Path(path)
    kind = compression(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "zstd":
        return _zstd_reader(path)
    return open(path, "rb")


def open_text(path: str | Path, errors: str = "strict") -> IO[str]:
    """The file as UTF-8 text (decompressed when compressed); ``errors`` as for :func:`open`."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors=errors, newline=None)


def _codec_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, OSError, lzma.LZMAError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def damaged(path: str | Path, exc: BaseException) -> LmforgeError:
    """The one error for a file its decompressor cannot read to the end."""
    kind = compression(path)
    what = f"{kind} file" if kind else "file"
    return LmforgeError(f"the {what} is damaged or cut off ({type(exc).__name__}: {exc})", where=str(path),
                        fix=f"check the file (e.g. {'gzip -t' if kind == 'gzip' else 'decompress it'}) or download it again")


@contextmanager
def guard(path: str | Path) -> Iterator[None]:
    """Turn a decompressor's error inside the block into one LmforgeError naming `path`."""
    try:
        yield
    except LmforgeError:
        raise
    except _codec_errors() as exc:
        if isinstance(exc, OSError) and not compression(path):
            raise
        raise damaged(path, exc) from exc


def guarded(path: str | Path, rows: Iterator[T]) -> Iterator[T]:
    """`rows`, with a decompressor's error (at any row) turned into one LmforgeError naming `path`."""
    with guard(path):
        yield from rows


def read_bytes(path: str | Path) -> bytes:
    with guard(path), open_binary(path) as handle:
        return handle.read()


def decompressed_copy(path: str | Path, folder: str | Path) -> Path:
    """The decompressed file in `folder` under the name without the compression suffix (for readers
    that only take plain files, such as pyarrow's Parquet reader)."""
    path = Path(path)
    target = Path(folder) / path.with_suffix("").name
    with guard(path), open_binary(path) as source, open(target, "wb") as out:
        while chunk := source.read(1 << 20):
            out.write(chunk)
    return target


__all__ = ["COMPRESSIONS", "compression", "damaged", "data_suffix", "decompressed_copy", "guard", "guarded",
           "open_binary", "open_text", "read_bytes"]
