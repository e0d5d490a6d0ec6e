"""Shared set-up for the inference tests: a tiny model's config, a generator from it, free ports."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from conftest import ARITHMETIC, tiny_config, write_config, write_jsonl

# A chat template built from the tiny tokenizer's words, so multi-turn rendering has real tokens.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_infer_config(tmp_path: Path, model_dir: Path, chat: bool = False, **extra: Any) -> Path:
    """A config for the tiny model: alpaca by default, or a chat_template format with ``chat=True``."""
    data = write_jsonl(tmp_path / "arith.jsonl", ARITHMETIC)
    config = tiny_config(model_dir, data, tmp_path / "out", **extra)
    if chat:
        config["datasets"] = [{"path": str(tmp_path / "chats.jsonl"), "type": "chat_template"}]
        config["chat_template"] = TINY_CHAT_TEMPLATE
    return write_config(tmp_path / ("chat.yml" if chat else "c.yml"), config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 120.0, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")
