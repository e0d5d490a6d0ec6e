"""`type: module.function` or `type: path/to/file.py:function`: a user's Python function converts each row.

Signature::

    def convert(row: dict) -> list[Segment] | list[tuple[str, bool]] | list[dict] | None

Return either
- segments: ``lmforge.data.formats.Segment(text, train)`` objects or ``(text, train)`` pairs,
  tokenized as written (BOS/EOS added as for any template format);
- OpenAI messages: ``[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]``,
  rendered with the config's ``chat_template`` and masked like ``type: chat_template``;
- ``None`` to skip the row (counted and reported, never silent).
A top-level dict of records keyed by id is read as one row per record with an ``id`` column.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from lmforge.config.hooks import is_hook
from lmforge.data.formats.base import Segment
from lmforge.errors import LmforgeError


class SkipRow(Exception):
    """Raised for a row the hook chose to skip (it returned None)."""


def looks_like_hook(kind: str) -> bool:
    return is_hook(kind)


@lru_cache(maxsize=32)
def load_hook(kind: str, where: str) -> Callable[[dict[str, Any]], Any]:
    if ".py:" in kind:
        file, _, name = kind.rpartition(":")
        path = Path(file).expanduser()
        if not path.is_file():
            raise LmforgeError(f"hook file does not exist: {file}", where=where, fix="give a path relative to the current folder")
        spec = importlib.util.spec_from_file_location(f"lmforge_hook_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module_name, _, name = kind.rpartition(".")
        try:  # an installed module: config.hooks resolved one in the config's folder to its file
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise LmforgeError(
                f"cannot import '{module_name}' for type {kind} ({exc})", where=where,
                fix="put it beside the config, install it, or write type: path/to/file.py:function",
            ) from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise LmforgeError(f"'{name}' is not a function in {kind.rpartition(':' if '.py:' in kind else '.')[0]}", where=where,
                           fix="name a function defined there (type: module.function or file.py:function)")
    return function


@dataclass(frozen=True)
class HookFormat:
    kind: str
    where: str
    chat: Any = None  # a ChatTemplateFormat for hooks that return messages, else None
    renders_special_tokens: bool = False  # decided per row; see segments

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        result = load_hook(self.kind, self.where)(row)
        if result is None:
            raise SkipRow(where)
        if not isinstance(result, list) or not result:
            raise LmforgeError(f"{self.kind} returned {type(result).__name__}; expected a non-empty list of segments or messages", where=where)
        first = result[0]
        if isinstance(first, dict):
            if self.chat is None:
                raise LmforgeError(f"{self.kind} returned messages, but no chat template is available", where=self.where, fix="set chat_template:")
            return self.chat.conversation_segments(self.chat.normalize(result, where), where)
        out = []
        for item in result:
            if isinstance(item, Segment):
                out.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                out.append(Segment(item[0], bool(item[1])))
            else:
                raise LmforgeError(f"{self.kind} returned {item!r}; expected Segment or (text, train)", where=where)
        return out

    def prompt(self, instruction: str) -> str:
        return self.chat.prompt(instruction) if self.chat is not None else instruction
