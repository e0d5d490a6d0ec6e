"""`type: input_output`: a row is a list of text segments, each with ``label: true/false``.

    {"segments": [{"text": "<s>Hello\n", "label": false}, {"text": "hi there!</s>", "label": true}]}

The text is used exactly as written (no template); ``label`` defaults to true.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.data.formats.base import Segment
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class InputOutputFormat:
    field: str = "segments"
    renders_special_tokens: bool = False

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        pieces = row.get(self.field)
        if not isinstance(pieces, list) or not pieces:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise LmforgeError(
                f"field '{self.field}' must be a non-empty list of {{text, label}} (columns present: {present})", where=where
            )
        out = []
        for number, piece in enumerate(pieces):
            if not isinstance(piece, dict) or not isinstance(piece.get("text"), str):
                raise LmforgeError(f"segment {number} needs a 'text' string", where=where, fix='write {"text": "...", "label": true}')
            label = piece.get("label", True)
            if not isinstance(label, bool):
                raise LmforgeError(f"segment {number}: label must be true or false, got {label!r}", where=where)
            out.append(Segment(piece["text"], label))
        return out

    def prompt(self, instruction: str) -> str:
        return instruction
