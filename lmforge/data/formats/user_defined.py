"""`type:` given as a mapping (axolotl's user-defined format): a prompt string filled from named fields."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from lmforge.config.sections import UserDefinedFormat
from lmforge.data.formats.base import Segment, field
from lmforge.errors import LmforgeError


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
    renders_special_tokens: bool = False

    def _render(self, template: str, instruction: str, input_text: str, system: str, where: str) -> str:
        try:
            return template.format(instruction=instruction, input=input_text, system=system)
        except (KeyError, IndexError) as exc:
            raise LmforgeError(
                f"format string names an unknown field {exc}", where=where, fix="use {instruction}, {input} or {system}"
            ) from exc

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        instruction = field(row, self.field_instruction, where)
        output = field(row, self.field_output, where)
        input_text = field(row, self.field_input, where, required=False) if self.field_input else ""
        system = field(row, self.field_system, where, required=False) if self.field_system else ""
        template = self.with_input if input_text else self.no_input
        prompt = self._render(template, instruction, input_text, system or self.system_prompt, where)
        return [Segment(prompt, train=False), Segment(output, train=True)]

    def prompt(self, instruction: str) -> str:
        return self._render(self.no_input, instruction, "", self.system_prompt, "prompt format")


def check_template(template: str, key: str) -> None:
    allowed = {"instruction", "input", "system"}
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in allowed:
            raise LmforgeError(
                f"format string uses {{{name}}}", where=key, fix="use only {instruction}, {input} and {system}; write {{ for a literal brace"
            )


def user_defined(kind: UserDefinedFormat, where: str) -> TemplateFormat:
    check_template(kind.format, where)
    no_input = kind.no_input_format or kind.format
    check_template(no_input, where)
    return TemplateFormat(
        field_instruction=kind.field_instruction,
        field_output=kind.field_output,
        with_input=kind.format,
        no_input=no_input,
        field_input=kind.field_input,
        field_system=kind.field_system,
        system_prompt=kind.system_prompt or "",
    )
