"""Atomic writes: a file or folder under its final name is always complete.

Every writer in lmforge that must survive a crash or a kill mid-write (checkpoints, the
prepared-data cache, converted models, outputs, JSON state) goes through these helpers: write
under a temporary sibling name, then rename, which POSIX makes atomic on one filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Write `text` to `path` through a temporary sibling file and a rename.

    `durable`: fsync the file and its folder too, so the write survives a power cut, not only a kill.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
