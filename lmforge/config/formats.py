"""The names a dataset's `type:` and a `chat_template:` may take, so `validate` refuses a wrong one.

The formats themselves live in `lmforge.data.formats`; this module only names them, so checking a
config stays free of the data code (and of torch). `tests/test_named_templates.py` holds the two
lists equal.
"""

from __future__ import annotations

BUILTIN_TYPES = ("alpaca", "alpaca_w_system", "completion", "input_output", "chat_template", "sharegpt")

# axolotl's `type: BASE:STYLE` instruction formats (its prompters.py): the base says which columns
# hold the instruction and the answer, the style how the prompt around them is written.
LEGACY_STYLES = ("instruct", "chat", "chatml", "phi")
LEGACY_BASES = ("alpaca", "jeopardy", "oasst", "gpteacher", "summarizetldr", "explainchoice", "concisechoice")
# axolotl's prompt-strategy modules that are one of those with a fixed style.
LEGACY_MODULES = {"alpaca_chat": ("alpaca", "chat"), "alpaca_instruct": ("alpaca", "instruct")}

# Named chat templates: lmforge's own four, then the model families' published templates shipped as
# .jinja files in lmforge/data/formats/chat_templates/ (axolotl's list of names).
CHAT_TEMPLATE_NAMES = (
    "chatml", "llama3", "mistral", "gemma",
    "alpaca", "aya", "cohere", "command_a", "command_a_rag", "command_a_tool_use", "deepseek_v2", "deepseek_v3",
    "exaone", "exaone4", "falcon_h1", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "jamba", "llama3_2_vision",
    "llama4", "llava", "metharme", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken",
    "nemotron_h", "phi_3", "phi_35", "phi_4", "pixtral", "qwen2_vl", "qwen3", "qwen3_5", "qwen_25",
)
FALLBACK_PREFIX = "tokenizer_default_fallback_"


def legacy_type(kind: object) -> tuple[str, str] | None:
    """(base, style) for axolotl's `BASE:STYLE` or style-fixing module names; None for anything else."""
    if not isinstance(kind, str):
        return None
    if kind in LEGACY_MODULES:
        return LEGACY_MODULES[kind]
    base, colon, style = kind.partition(":")
    if colon and base in LEGACY_BASES and style in LEGACY_STYLES:
        return base, style
    if not colon and base in LEGACY_BASES and base != "alpaca":  # jeopardy, oasst...: axolotl's default style
        return base, "instruct"
    return None


def type_problem(kind: str) -> str | None:
    """Why a string `type:` (not a hook) is not one lmforge reads, or None when it is."""
    if kind in BUILTIN_TYPES or legacy_type(kind) is not None:
        return None
    base, colon, style = kind.partition(":")
    if colon and base in LEGACY_BASES:
        return f"unknown prompt style '{style}' in type: {kind} (styles: {', '.join(LEGACY_STYLES)})"
    return f"unknown dataset type '{kind}'"


def template_problem(setting: str | None) -> str | None:
    """Why a `chat_template:` value names no template lmforge has, or None when it does (or is Jinja text)."""
    if setting in (None, "", "tokenizer_default", "jinja") or "{" in setting:
        return None
    name = setting[len(FALLBACK_PREFIX):] if setting.startswith(FALLBACK_PREFIX) else setting
    if name in CHAT_TEMPLATE_NAMES:
        return None
    return f"unknown chat_template '{name}'"
