"""How every recipe talks to the user: one prefixed, flushed line at a time.

Under torchrun only rank 0 speaks (RANK is set by the launcher), so a run on N ranks prints what one
process would, once.
"""

from __future__ import annotations

import os


def say(message: str) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"[lmforge] {message}", flush=True)
