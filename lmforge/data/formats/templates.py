"""Named chat templates (`chat_template: chatml | llama3 | mistral | gemma`) and how a template is chosen.

Each named template lists the marker tokens it needs: a tokenizer that does not know them as
single tokens would split "<|im_start|>" into pieces the model cannot learn to emit, so that is
an error, not a silent degradation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class NamedTemplate:
    source: str
    markers: tuple[str, ...]
    end_of_turn: str | None  # None: the tokenizer's eos_token


NAMED_TEMPLATES = {
    "chatml": NamedTemplate(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
    ),
    "llama3": NamedTemplate(
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
    ),
    "mistral": NamedTemplate(
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}",
        (),
        None,
    ),
    "gemma": NamedTemplate(
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
    ),
}

# End-of-turn markers of common templates, tried in order when the template is not a named one.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def _single_token(tokenizer: Any, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def resolve_template(setting: str | None, tokenizer: Any, where: str = "chat_template") -> tuple[str, tuple[str, ...]]:
    """(Jinja source, end-of-turn candidates) for a `chat_template:` value."""
    eos = getattr(tokenizer, "eos_token", None)
    if setting in (None, "", "tokenizer_default"):
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise LmforgeError(
                "the tokenizer has no chat template", where=where,
                fix=f"set chat_template: to one of {', '.join(NAMED_TEMPLATES)} or a Jinja template string",
            )
        if isinstance(source, dict):  # several named templates on one tokenizer
            source = source.get("default") or next(iter(source.values()))
        return source, KNOWN_END_OF_TURN + ((eos,) if eos else ())
    if setting in NAMED_TEMPLATES:
        named = NAMED_TEMPLATES[setting]
        missing = [m for m in named.markers if not _single_token(tokenizer, m)]
        if missing:
            raise LmforgeError(
                f"chat_template {setting} needs the tokens {', '.join(missing)}, which this tokenizer does not have",
                where=where,
                fix="use chat_template: tokenizer_default, or a template built from the tokenizer's own special tokens",
            )
        end = named.end_of_turn or eos
        if not end:
            raise LmforgeError(f"chat_template {setting} ends turns with eos_token, and the tokenizer has none", where=where, fix="set special_tokens: {eos_token: ...}")
        return named.source, (end,)
    if "{{" in setting or "{%" in setting:
        return setting, KNOWN_END_OF_TURN + ((eos,) if eos else ())
    raise LmforgeError(
        f"unknown chat_template '{setting}'", where=where,
        fix=f"use tokenizer_default, one of {', '.join(NAMED_TEMPLATES)}, or a Jinja template string",
    )
