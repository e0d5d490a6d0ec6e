"""How every recipe talks to the user: one prefixed, flushed line at a time."""

from __future__ import annotations


def say(message: str) -> None:
    print(f"[lmforge] {message}", flush=True)
