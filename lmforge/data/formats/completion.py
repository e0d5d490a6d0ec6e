"""`type: completion`: raw text (continued pretraining); every token is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.data.formats.base import Segment, field


@dataclass(frozen=True)
class CompletionFormat:
    field: str = "text"
    renders_special_tokens: bool = False

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        return [Segment(field(row, self.field, where), train=True)]

    def prompt(self, instruction: str) -> str:
        return instruction
