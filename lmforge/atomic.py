"""Atomic writes: a file or folder under its final name is always complete.

Every writer in lmforge that must survive a crash or a kill mid-write (checkpoints, the
prepared-data cache, converted models, outputs, JSON state) goes through these helpers: write
under a temporary sibling name, then rename, which POSIX makes atomic on one filesystem.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether `exc` (raised while writing into `folder`) means the disk is full. Libraries wrap the
    OS error their own way (torch.save: "file write failed", safetensors: "StorageFull"), so the
    folder's free space decides when the message is not plain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "No space left" in text or "StorageFull" in text or "os error 28" in text:
        return True
    try:
        return "write" in text.lower() and shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def _full_disk_error(target: Path, exc: BaseException) -> LmforgeError:
    return LmforgeError(f"the disk is full: could not write {target.name} ({type(exc).__name__})", where=str(target.parent),
                        fix="free space there or set output_dir elsewhere, then rerun (what was saved before is "
                            "untouched: resume_from_checkpoint: auto continues from the last checkpoint)")


def write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Write `text` to `path` through a temporary sibling file and a rename.

    `durable`: fsync the file and its folder too, so the write survives a power cut, not only a kill.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as exc:
        full = _disk_full(exc, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise _full_disk_error(path, exc) from exc
        raise
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` (a library's own writer: savefig, torch.save, ...) onto a temporary sibling file,
    then rename it onto `path`: a reader never meets half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # the suffix kept: savefig picks the format by it
    try:
        write(tmp)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _disk_full(exc, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise _full_disk_error(path, exc) from exc
        raise
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any, *, indent: int = 2, durable: bool = False) -> None:
    write_text(path, json.dumps(data, indent=indent), durable=durable)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temporary sibling folder, then rename it onto `target`.

    An existing `target` is first renamed aside (``.NAME.old-PID``) and deleted after the swap;
    :func:`restore_swapped` puts it back if a kill lands between the two renames.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _disk_full(exc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _full_disk_error(target, exc) from exc
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def restore_swapped(folder: Path) -> None:
    """Undo what a kill between atomic_dir's two renames left: ``.NAME.old-PID`` with no NAME."""
    for old in Path(folder).glob(".*.old-*"):
        name = old.name[1:].rsplit(".old-", 1)[0]
        target = old.with_name(name)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(target)


def publish_into(target: Path, write: Callable[[Path], None]) -> None:
    """Write files into a temporary folder inside `target`, then move each into place with an atomic rename."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".publish-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
    except Exception as exc:
        if _disk_full(exc, tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            raise _full_disk_error(target, exc) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
