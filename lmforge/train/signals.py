"""SIGTERM / Ctrl-C: finish the current step, save a checkpoint, then exit. A second signal exits at once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def stop_on_signals(callbacks: Any) -> Iterator[None]:
    """Set `callbacks.stop_requested` on SIGTERM/SIGINT while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        if callbacks.stop_requested:
            raise KeyboardInterrupt
        callbacks.stop_requested = True
        if os.environ.get("RANK", "0") == "0":  # torchrun passes the signal to every rank; one line is enough
            print(f"\n[lmforge] {signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(send it again to stop without saving)", flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt like Ctrl-C, so cleanup (`finally`, the
    output_dir lock) runs and the exit code is 130, also before the loop installs `stop_on_signals`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
