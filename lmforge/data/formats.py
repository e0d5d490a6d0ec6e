"""Dataset formats (`type:`): each turns one row into text segments marked trainable or not.

A format knows nothing of tokenizers; `tokenize` turns segments into ids and labels, so
"loss only on the response" is decided here once, by the `train` flag of each segment.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Protocol

from lmforge.config.sections import UserDefinedFormat
from lmforge.errors import LmforgeError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool


class PromptFormat(Protocol):
    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        """The row as prompt/response segments; raises LmforgeError naming `where` for a bad row."""

    def prompt(self, instruction: str) -> str:
        """The prompt a user's text becomes at inference, matching training."""


def _field(row: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return ""
        present = ", ".join(sorted(row)) or "none"
        problem = "is missing" if name not in row else "is empty"
        raise LmforgeError(f"field '{name}' {problem} (columns present: {present})", where=where, fix="fix the row or the field mapping")
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class TemplateFormat:
    """A prompt template filled from named fields, then the output field as the trained response."""

    field_instruction: str
    field_output: str
    with_input: str
    no_input: str
    field_input: str | None = None
    field_system: str | None = None
    system_prompt: str = ""

    def _render(self, template: str, instruction: str, input_text: str, system: str, where: str) -> str:
        try:
            return template.format(instruction=instruction, input=input_text, system=system)
        except (KeyError, IndexError) as exc:
            raise LmforgeError(
                f"format string names an unknown field {exc}", where=where, fix="use {instruction}, {input} or {system}"
            ) from exc

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        instruction = _field(row, self.field_instruction, where)
        output = _field(row, self.field_output, where)
        input_text = _field(row, self.field_input, where, required=False) if self.field_input else ""
        system = _field(row, self.field_system, where, required=False) if self.field_system else ""
        template = self.with_input if input_text else self.no_input
        prompt = self._render(template, instruction, input_text, system or self.system_prompt, where)
        return [Segment(prompt, train=False), Segment(output, train=True)]

    def prompt(self, instruction: str) -> str:
        return self._render(self.no_input, instruction, "", self.system_prompt, "prompt format")


def _check_template(template: str, key: str) -> None:
    allowed = {"instruction", "input", "system"}
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in allowed:
            raise LmforgeError(
                f"format string uses {{{name}}}", where=key, fix="use only {instruction}, {input} and {system}; write {{ for a literal brace"
            )


BUILTIN_TYPES = ("alpaca",)


def get_format(kind: str | UserDefinedFormat, where: str = "datasets.type") -> PromptFormat:
    """The format object for a dataset's `type:` value."""
    if isinstance(kind, UserDefinedFormat):
        _check_template(kind.format, where)
        no_input = kind.no_input_format or kind.format
        _check_template(no_input, where)
        return TemplateFormat(
            field_instruction=kind.field_instruction,
            field_output=kind.field_output,
            with_input=kind.format,
            no_input=no_input,
            field_input=kind.field_input,
            field_system=kind.field_system,
            system_prompt=kind.system_prompt or "",
        )
    if kind == "alpaca":
        return TemplateFormat("instruction", "output", ALPACA_WITH_INPUT, ALPACA_NO_INPUT, field_input="input")
    raise LmforgeError(
        f"unknown dataset type '{kind}'",
        where=where,
        fix=f"use one of: {', '.join(BUILTIN_TYPES)}, or a mapping with field_instruction/field_output/format",
    )
