"""What every format shares: the Segment contract and field lookup with errors that list the columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Segment:
    """A piece of one example's text; ``train`` marks whether its tokens carry labels."""

    text: str
    train: bool


class PromptFormat(Protocol):
    # True when the segments already hold every special token (a chat template renders BOS and
    # end-of-turn itself): they are then tokenized as one string, with no BOS/EOS added.
    renders_special_tokens: bool

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        """The row as prompt/response segments; raises LmforgeError naming `where` for a bad row."""

    def prompt(self, instruction: str) -> str:
        """The prompt a user's text becomes at inference, matching training."""


def field(row: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return ""
        present = ", ".join(sorted(map(str, row))) or "none"
        problem = "is missing" if name not in row else "is empty"
        raise LmforgeError(f"field '{name}' {problem} (columns present: {present})", where=where, fix="fix the row or the field mapping")
    return value if isinstance(value, str) else str(value)
