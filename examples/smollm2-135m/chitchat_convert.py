"""Converter for the chit-chat dataset (PyPI `chitchat-dataset`, file dataset.json), used as
`type: examples/smollm2-135m/chitchat_convert.py:convert`.

dataset.json is an object keyed by conversation id; lmforge reads it as one row per
conversation (``{"id": ..., "messages": [[{"text", "sender", "timestamp"}, ...], ...], ...}``).
Each inner list is one turn: consecutive messages by the same sender. A type hook receives one
row (a dict) and returns OpenAI messages (rendered with the config's chat_template), segments
``[(text, train), ...]``, or None to skip the row (counted and reported).
"""

from __future__ import annotations


def convert(row: dict) -> list[dict] | None:
    turns = [turn for turn in row.get("messages", []) if turn]
    if len(turns) < 2:
        return None  # nothing to answer
    first = turns[0][0]["sender"]
    messages = []
    for turn in turns:
        role = "user" if turn[0]["sender"] == first else "assistant"
        text = "\n".join(m["text"].strip() for m in turn if m.get("text", "").strip())
        if not text:
            continue
        if messages and messages[-1]["role"] == role:  # keep turns alternating
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages if any(m["role"] == "assistant" for m in messages) else None
