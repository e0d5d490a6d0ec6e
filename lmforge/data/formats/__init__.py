"""Dataset formats (`type:`): each turns one row into text segments marked trainable or not.

One module per format: alpaca (+ alpaca_w_system), completion, input_output, chat
(chat_template), user_defined (a mapping), hook (a user's function), legacy (axolotl's `BASE:STYLE`). A format knows nothing of
token ids; `lmforge.data.prepare.tokenize_rows` turns segments into ids and labels, so "loss only
on the response" is decided once, by the `train` flag of each segment.
"""

from __future__ import annotations

from typing import Any

from lmforge.config.formats import BUILTIN_TYPES
from lmforge.config.sections import UserDefinedFormat
from lmforge.data.formats.alpaca import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, alpaca, alpaca_w_system
from lmforge.data.formats.base import PromptFormat, Segment
from lmforge.data.formats.chat import DEFAULT_ROLES, RESERVED_VARIABLES, ChatTemplateFormat, check_template
from lmforge.data.formats.completion import CompletionFormat
from lmforge.data.formats.hook import HookFormat, SkipRow, looks_like_hook
from lmforge.data.formats.input_output import InputOutputFormat
from lmforge.data.formats.legacy import legacy_format
from lmforge.data.formats.mistral import EncodedPrompt, MistralChatFormat, TokenSegment, is_mistral_common
from lmforge.data.formats.templates import NAMED_TEMPLATES, has_generation_blocks, prepare_chat_tokenizer, resolve_template
from lmforge.data.formats.user_defined import TemplateFormat, user_defined
from lmforge.errors import LmforgeError


__all__ = [
    "ALPACA_NO_INPUT", "ALPACA_WITH_INPUT", "BUILTIN_TYPES", "NAMED_TEMPLATES", "ChatTemplateFormat", "CompletionFormat",
    "EncodedPrompt", "HookFormat", "InputOutputFormat", "MistralChatFormat", "PromptFormat", "Segment", "SkipRow",
    "TemplateFormat", "TokenSegment", "get_format", "is_mistral_common",
    "prepare_chat_tokenizer",
]


def chat_format(spec: Any, tokenizer: Any, chat_template: str | None, where: str, data: Any = None) -> ChatTemplateFormat:
    """The chat format of a dataset entry: its template (its own, else the top-level one) and keys."""
    if tokenizer is None:
        raise LmforgeError("chat_template needs the tokenizer", where=where)
    entry = where.rsplit(".type", 1)[0] if where.endswith(".type") else where
    setting, jinja, key = chat_template, None, "chat_template"
    if data is not None:
        setting, jinja = data.chat_template, data.chat_template_jinja
    if getattr(spec, "chat_template", None):
        setting, jinja, key = spec.chat_template, spec.chat_template_jinja, f"{entry}.chat_template"
    source, ends = resolve_template(setting, tokenizer, where=key, jinja=jinja)
    check_template(source, key)
    eot_tokens = getattr(data, "eot_tokens", None)
    if eot_tokens:
        split = [t for t in eot_tokens if len(tokenizer(t, add_special_tokens=False).input_ids) != 1]
        if split:
            raise LmforgeError(
                f"eot_tokens {', '.join(split)} are not single tokens of this tokenizer", where="eot_tokens",
                fix="list the template's turn-ending tokens as the tokenizer has them, or add them with special_tokens",
            )
        ends = tuple(eot_tokens)
    kwargs = dict(getattr(data, "chat_template_kwargs", None) or {})
    reserved = sorted(set(kwargs) & set(RESERVED_VARIABLES))
    if reserved:
        raise LmforgeError(f"chat_template_kwargs cannot set {', '.join(reserved)}", where="chat_template_kwargs", fix=f"remove {', '.join(reserved)}: lmforge sets it")
    keys = _conversation_keys(spec)
    eos = tokenizer.eos_token or ""
    if keys["train_on_eot"] is not None and keys["train_on_eot"] != keys["train_on_eos"] and eos in ends:
        raise LmforgeError(
            f"train_on_eos: {keys['train_on_eos']} and train_on_eot: {keys['train_on_eot']} disagree, and this template ends turns with EOS ({eos})",
            where=f"{entry}.train_on_eot", fix="set them to the same value",
        )
    return ChatTemplateFormat(
        template=source,
        end_of_turn=ends,
        # What apply_chat_template gives a template: the special tokens, then the user's variables.
        variables={**tokenizer.special_tokens_map, **kwargs},
        generation=has_generation_blocks(source),
        **keys,
    )


def _conversation_keys(spec: Any) -> dict[str, Any]:
    """How a chat dataset entry's rows are read and which turns train: ChatTemplateFormat's fields from its keys."""
    mappings = dict(getattr(spec, "message_property_mappings", None) or {})
    roles = dict(DEFAULT_ROLES)
    for role, names in (getattr(spec, "roles", None) or {}).items():
        for name in [names] if isinstance(names, str) else names:
            roles[name] = role
    return dict(
        field_messages=getattr(spec, "field_messages", None),
        role_key=mappings.pop("role", None),
        content_key=mappings.pop("content", None),
        property_mappings=mappings,
        roles=roles,
        # as in axolotl, a speaker name (gpt, human) stands for its role
        roles_to_train=tuple(roles.get(r, r) for r in (getattr(spec, "roles_to_train", None) or ("assistant",))),
        train_on_eos=getattr(spec, "train_on_eos", None) or "turn",
        train_on_eot=getattr(spec, "train_on_eot", None),
        field_thinking=getattr(spec, "field_thinking", None) or "reasoning_content",
        thinking_key=getattr(spec, "template_thinking_key", None) or "reasoning_content",
        split_thinking=bool(getattr(spec, "split_thinking", None)),
        train_on_thinking=getattr(spec, "train_on_thinking", None) is not False,
        drop_system_message=bool(getattr(spec, "drop_system_message", None)),
    )


def mistral_chat_format(spec: Any, tokenizer: Any, where: str) -> MistralChatFormat:
    """A chat dataset entry encoded by mistral-common (tokenizer_use_mistral_common): its rows read as chat rows are,
    content parts kept for mistral-common, and no template (validate refuses the chat_template keys beside it)."""
    entry = where.rsplit(".type", 1)[0] if where.endswith(".type") else where
    if getattr(spec, "train_on_thinking", None) is False:
        raise LmforgeError("train_on_thinking: false is not supported with tokenizer_use_mistral_common (mistral-common "
                           "encodes the reasoning and the answer of a turn as one run)", where=f"{entry}.train_on_thinking",
                           fix="remove train_on_thinking, or set tokenizer_use_mistral_common: false")
    reader = ChatTemplateFormat(template="", end_of_turn=(), keep_parts=True, **_conversation_keys(spec))
    return MistralChatFormat(tokenizer=tokenizer, reader=reader)


def get_format(
    kind: str | UserDefinedFormat, where: str = "datasets.type", *, spec: Any = None, tokenizer: Any = None,
    chat_template: str | None = None, data: Any = None,
) -> PromptFormat:
    """The format object for a dataset's `type:` value.

    `spec` (a DatasetSpec) supplies per-format keys (field, field_messages, ...); `tokenizer` and the
    template are needed only by chat formats: `data` (the DataSection: chat_template,
    chat_template_jinja, chat_template_kwargs, eot_tokens) or, without it, `chat_template` alone.
    Training and inference both build their format here, so both render alike.
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
    if isinstance(kind, str) and (legacy := legacy_format(kind)) is not None:
        return legacy
    if kind in ("chat_template", "sharegpt"):
        if is_mistral_common(tokenizer):
            return mistral_chat_format(spec, tokenizer, where)
        return chat_format(spec, tokenizer, chat_template, where, data)
    if isinstance(kind, str) and looks_like_hook(kind):
        wants_chat = chat_template or getattr(data, "chat_template", None) or getattr(spec, "chat_template", None)
        chat = chat_format(spec, tokenizer, chat_template, where, data) if (tokenizer is not None and wants_chat) else None
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
