"""axolotl's `type: BASE:STYLE` instruction formats (`alpaca:chat`, `alpaca:phi`, `jeopardy`, `oasst:chatml`...).

The base names the columns (alpaca: instruction/input/output, jeopardy: question/category/answer,
...); the style writes the prompt around them: `instruct` (### Instruction/### Response), `chat`
(USER:/ASSISTANT:), `chatml` and `phi` (their turn markers as plain text). The strings are axolotl's
(src/axolotl/prompters.py), so a config moved from axolotl trains on the same text: a preamble
(one with and one without input), then the turn, then the answer, which alone is trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.config.formats import legacy_type
from lmforge.data.formats.alpaca import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from lmforge.data.formats.base import Segment, field
from lmforge.data.formats.user_defined import TemplateFormat

ALPACA_SYSTEM = ALPACA_WITH_INPUT.split("\n\n")[0]
ALPACA_SYSTEM_NO_INPUT = ALPACA_NO_INPUT.split("\n\n")[0]
# style → (system format, turn with input, turn without input)
STYLES = {
    "instruct": ("{system}\n\n", "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                 "### Instruction:\n{instruction}\n\n### Response:\n"),
    "chat": ("SYSTEM: {system}\n", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"),
    "chatml": ("<|im_start|>system\n{system}<|im_end|>\n",
               "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"),
    "phi": ("<|system|>\n{system}<|end|>\n", "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
            "<|user|>\n{instruction}<|end|>\n<|assistant|>\n"),
}
CHOICE_EXPLAIN = "Choose the answer that best answers the question. Explain your reasoning.\n"
CHOICE_CONCISE = "Choose the answer that best answers the question. Be concise in your response.\n\n"
TLDR = "USER: Summarize the following article as a TL;DR.\n"


def _choices(row: dict[str, Any], where: str) -> str:
    choices = row.get("choices")
    if not isinstance(choices, list) or not choices:
        return field(row, "choices", where)  # names the missing column
    return "\n".join(f'- "{choice}"' for choice in choices)


def _solution(row: dict[str, Any], where: str) -> str:
    return field(row, "solution" if row.get("solution") else "explanation", where)


# base → (instruction, input, output) readers of a row, and the (with input, without input) preambles.
Reader = Callable[[dict[str, Any], str], str]
BASES: dict[str, tuple[Reader, Reader, Reader, tuple[str, str]]] = {
    "alpaca": (lambda r, w: field(r, "instruction", w), lambda r, w: field(r, "input", w, required=False),
               lambda r, w: field(r, "output", w), (ALPACA_SYSTEM, ALPACA_SYSTEM_NO_INPUT)),
    "gpteacher": (lambda r, w: field(r, "instruction", w), lambda r, w: field(r, "input", w, required=False),
                  lambda r, w: field(r, "response", w), (ALPACA_SYSTEM, ALPACA_SYSTEM_NO_INPUT)),
    "jeopardy": (lambda r, w: field(r, "question", w), lambda r, w: field(r, "category", w, required=False),
                 lambda r, w: "what is " + field(r, "answer", w), (ALPACA_SYSTEM, ALPACA_SYSTEM_NO_INPUT)),
    "oasst": (lambda r, w: field(r, "INSTRUCTION", w), lambda r, w: "", lambda r, w: field(r, "RESPONSE", w),
              (ALPACA_SYSTEM, ALPACA_SYSTEM_NO_INPUT)),
    "summarizetldr": (lambda r, w: field(r, "article", w), lambda r, w: "", lambda r, w: field(r, "summary", w), ("", "")),
    "explainchoice": (lambda r, w: field(r, "question", w), _choices, _solution, (CHOICE_EXPLAIN, CHOICE_EXPLAIN)),
    "concisechoice": (lambda r, w: field(r, "question", w), _choices, _solution, (CHOICE_CONCISE, CHOICE_CONCISE)),
}


@dataclass(frozen=True)
class LegacyFormat:
    """One base's columns read into axolotl's prompt for one style; the answer is the trained segment."""

    base: str
    style: str
    renders_special_tokens: bool = False

    def _template(self) -> TemplateFormat:
        system_format, with_input, no_input = STYLES[self.style]
        if self.base == "concisechoice":  # axolotl's prompter writes these turns, and the bare system, whatever the style
            system_format, with_input, no_input = "{system}", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"
        if self.base == "summarizetldr":
            with_input, no_input = TLDR + "{instruction}\n{input}\nASSISTANT:", TLDR + "{instruction}\nASSISTANT:"
        system, system_no_input = BASES[self.base][3]

        def preamble(text: str) -> str:  # the system text is fixed: escape its braces for str.format
            return system_format.format(system=text).replace("{", "{{").replace("}", "}}") if text else ""

        return TemplateFormat("instruction", "output", preamble(system) + with_input, preamble(system_no_input) + no_input,
                              field_input="input")

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        read_instruction, read_input, read_output, _ = BASES[self.base]
        mapped = {"instruction": read_instruction(row, where), "input": read_input(row, where), "output": read_output(row, where)}
        return self._template().segments(mapped, where)

    def prompt(self, instruction: str) -> str:
        return self._template().prompt(instruction)


def legacy_format(kind: str) -> LegacyFormat | None:
    """The format for `type: BASE:STYLE` (or alpaca_chat/alpaca_instruct, jeopardy...), None for other types."""
    parsed = legacy_type(kind)
    return LegacyFormat(*parsed) if parsed else None
