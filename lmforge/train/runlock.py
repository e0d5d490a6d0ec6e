"""One run per output_dir: a lock file holding the owner's pid, so two runs never interleave checkpoints.

The lock is ``OUTPUT_DIR/.lmforge.lock`` (JSON: pid, host, the process's start time, the
command), created with ``O_EXCL`` so two runs starting at once cannot both win. A lock whose
process is gone (killed, crashed, the machine rebooted) is stale: the next run takes it over and
says so. The process start time tells a live owner from an unrelated process that reused its pid.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

LOCK_NAME = ".lmforge.lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner_running(owner: dict[str, Any]) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    started = _start_time(pid)
    return started is None or owner.get("started") in (None, started)


class RunLock:
    """Hold ``output_dir``'s lock while a run writes there (a context manager)."""

    def __init__(self, output_dir: Path, command: str = "train", say: Callable[[str], None] = print) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.command = command
        self.say = say
        self.held = False

    def _mine(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
                "command": " ".join(["lmforge", self.command, *sys.argv[2:]])[:300]}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self._mine(), handle)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another run may take over the same stale lock at the same moment
            if self._create():
                self.held = True
                return
            try:
                owner = json.loads(self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue  # released between our attempt and the read
            except (OSError, ValueError):
                owner = {}
            same_host = owner.get("host") in (None, socket.gethostname())
            if owner.get("pid") != os.getpid() and (not same_host or _owner_running(owner)):
                where = f"pid {owner.get('pid')}" + ("" if same_host else f" on {owner.get('host')}")
                raise LmforgeError(
                    f"output_dir {self.path.parent} is in use by another run ({where}: {owner.get('command', 'lmforge')})",
                    where=str(self.path),
                    fix="wait for that run to finish, stop it, or set another output_dir"
                    + ("" if same_host else f"; if it is not running, delete {self.path}"),
                )
            if owner.get("pid") != os.getpid():
                self.say(f"taking over a stale lock on {self.path.parent} (pid {owner.get('pid', '?')} is no longer running)")
            self.path.unlink(missing_ok=True)
        raise LmforgeError(f"could not lock output_dir {self.path.parent}", where=str(self.path), fix="try again")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                owner = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return
            if owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
