"""Dataset formats (`type:`): each turns one row into text segments marked trainable or not.

One module per format: alpaca (+ alpaca_w_system), completion, input_output, chat
(chat_template), user_defined (a mapping), hook (a user's function). A format knows nothing of
token ids; `lmforge.data.prepare.tokenize_rows` turns segments into ids and labels, so "loss only
on the response" is decided once, by the `train` flag of each segment.
"""

from __future__ import annotations

from typing import Any

from lmforge.config.sections import UserDefinedFormat
from lmforge.data.formats.alpaca import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, alpaca, alpaca_w_system
from lmforge.data.formats.base import PromptFormat, Segment
from lmforge.data.formats.chat import DEFAULT_ROLES, ChatTemplateFormat
from lmforge.data.formats.completion import CompletionFormat
from lmforge.data.formats.hook import HookFormat, SkipRow, looks_like_hook
from lmforge.data.formats.input_output import InputOutputFormat
from lmforge.data.formats.templates import NAMED_TEMPLATES, resolve_template
from lmforge.data.formats.user_defined import TemplateFormat, user_defined
from lmforge.errors import LmforgeError

BUILTIN_TYPES = ("alpaca", "alpaca_w_system", "completion", "input_output", "chat_template", "sharegpt")

__all__ = [
    "ALPACA_NO_INPUT", "ALPACA_WITH_INPUT", "BUILTIN_TYPES", "NAMED_TEMPLATES", "ChatTemplateFormat", "CompletionFormat",
    "HookFormat", "InputOutputFormat", "PromptFormat", "Segment", "SkipRow", "TemplateFormat", "get_format",
]


def chat_format(spec: Any, tokenizer: Any, chat_template: str | None, where: str) -> ChatTemplateFormat:
    if tokenizer is None:
        raise LmforgeError("chat_template needs the tokenizer", where=where)
    source, ends = resolve_template(chat_template, tokenizer, where="chat_template")
    mappings = dict(getattr(spec, "message_property_mappings", None) or {})
    roles = dict(DEFAULT_ROLES)
    for role, names in (getattr(spec, "roles", None) or {}).items():
        for name in [names] if isinstance(names, str) else names:
            roles[name] = role
    return ChatTemplateFormat(
        template=source,
        end_of_turn=ends,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        field_messages=getattr(spec, "field_messages", None),
        role_key=mappings.get("role"),
        content_key=mappings.get("content"),
        roles=roles,
        roles_to_train=tuple(getattr(spec, "roles_to_train", None) or ("assistant",)),
        train_on_eos=getattr(spec, "train_on_eos", None) or "turn",
    )


def get_format(
    kind: str | UserDefinedFormat, where: str = "datasets.type", *, spec: Any = None, tokenizer: Any = None,
    chat_template: str | None = None,
) -> PromptFormat:
    """The format object for a dataset's `type:` value.

    `spec` (a DatasetSpec) supplies per-format keys (field, field_messages, ...); `tokenizer` and
    `chat_template` are needed only by chat formats.
    """
    if isinstance(kind, UserDefinedFormat):
        return user_defined(kind, where)
    if kind == "alpaca":
        return alpaca()
    if kind == "alpaca_w_system":
        return alpaca_w_system(getattr(spec, "system_prompt", None))
    if kind == "completion":
        return CompletionFormat(getattr(spec, "field", None) or "text")
    if kind == "input_output":
        return InputOutputFormat(getattr(spec, "field", None) or "segments")
    if kind in ("chat_template", "sharegpt"):
        return chat_format(spec, tokenizer, chat_template, where)
    if isinstance(kind, str) and looks_like_hook(kind):
        chat = chat_format(spec, tokenizer, chat_template, where) if (tokenizer is not None and chat_template) else None
        hook = HookFormat(kind, where, chat, renders_special_tokens=chat is not None)
        from lmforge.data.formats.hook import load_hook

        load_hook(kind, where)  # fail now, naming the key, not on the first row
        return hook
    raise LmforgeError(
        f"unknown dataset type '{kind}'",
        where=where,
        fix=f"use one of: {', '.join(BUILTIN_TYPES)}, module.function, file.py:function, "
        "or a mapping with field_instruction/field_output/format",
    )
