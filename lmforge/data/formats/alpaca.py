"""`type: alpaca` (instruction / optional input / output) and `alpaca_w_system` (plus a system prompt)."""

from __future__ import annotations

from lmforge.data.formats.user_defined import TemplateFormat

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# axolotl's alpaca_w_system: the row's `system` column (or system_prompt) replaces the fixed preamble.
SYSTEM_WITH_INPUT = "{system}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SYSTEM_NO_INPUT = "{system}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def alpaca() -> TemplateFormat:
    return TemplateFormat("instruction", "output", ALPACA_WITH_INPUT, ALPACA_NO_INPUT, field_input="input")


def alpaca_w_system(system_prompt: str | None = None) -> TemplateFormat:
    return TemplateFormat(
        "instruction", "output", SYSTEM_WITH_INPUT, SYSTEM_NO_INPUT, field_input="input", field_system="system",
        system_prompt=system_prompt or DEFAULT_SYSTEM,
    )
