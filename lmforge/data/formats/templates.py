"""Which chat template a dataset uses, the tokens it ends turns with, and the marker tokens it needs.

`chat_template:` takes axolotl's values: `tokenizer_default` (the tokenizer's own),
`tokenizer_default_fallback_NAME` (the tokenizer's own, else NAME), a name (`chatml`, `llama3`,
`mistral`, `gemma`), `jinja` with `chat_template_jinja` (text or a .jinja file), or a Jinja string.
A dataset's own `chat_template` overrides the top-level one.

Each named template lists the marker tokens it needs. A tokenizer that does not know them as single
tokens would split "<|im_start|>" into pieces the model cannot learn to emit, so training adds them
as special tokens (`prepare_chat_tokenizer`, called where the training tokenizer is built) and the
model grows its embeddings; a tokenizer that reaches a format without them is an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config.formats import FALLBACK_PREFIX
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

# The model families' published templates, shipped as lmforge/data/formats/chat_templates/NAME.jinja
# (see the README there for where each comes from): the marker tokens each needs as single tokens,
# and the token that ends a turn (None: the tokenizer's eos_token).
CHATML = ("<|im_start|>", "<|im_end|>")
COHERE = ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>")
COMMAND_A = COHERE + ("<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>")
LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
GEMMA = ("<start_of_turn>", "<end_of_turn>")
PHI3 = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MISTRAL = ("[INST]", "[/INST]")
FILE_TEMPLATES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "alpaca": ((), None),
    "aya": (COHERE, "<|END_OF_TURN_TOKEN|>"),
    "cohere": (COHERE, "<|END_OF_TURN_TOKEN|>"),
    "command_a": (COMMAND_A, "<|END_OF_TURN_TOKEN|>"),
    "command_a_rag": (COMMAND_A, "<|END_OF_TURN_TOKEN|>"),
    "command_a_tool_use": (COMMAND_A, "<|END_OF_TURN_TOKEN|>"),
    "deepseek_v2": (("<｜User｜>", "<｜Assistant｜>"), None),
    "deepseek_v3": (("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"), "<｜end▁of▁sentence｜>"),
    "exaone": (("[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]"), "[|endofturn|]"),
    "exaone4": (("[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]"), "[|endofturn|]"),
    "falcon_h1": (CHATML, "<|im_end|>"),
    "gemma3": (GEMMA, "<end_of_turn>"),
    "gemma3n": (GEMMA, "<end_of_turn>"),
    "gemma4": (("<|turn>", "<turn|>"), "<turn|>"),
    "gemma4_unified": (("<|turn>", "<turn|>"), "<turn|>"),
    "jamba": (("<|bom|>", "<|eom|>"), "<|eom|>"),
    "llama3_2_vision": (LLAMA3, "<|eot_id|>"),
    "llama4": (("<|header_start|>", "<|header_end|>", "<|eot|>"), "<|eot|>"),
    "llava": ((), None),
    "metharme": (("<|system|>", "<|user|>", "<|model|>"), None),
    "mistral_v1": ((), None),
    "mistral_v2v3": (MISTRAL, None),
    "mistral_v3_tekken": (MISTRAL, None),
    "mistral_v7_tekken": (MISTRAL + ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"), None),
    "nemotron_h": (CHATML, "<|im_end|>"),
    "phi_3": (PHI3, "<|end|>"),
    "phi_35": (PHI3, "<|end|>"),
    "phi_4": (("<|im_start|>", "<|im_sep|>", "<|im_end|>"), "<|im_end|>"),
    "pixtral": (MISTRAL, None),
    "qwen2_vl": (CHATML, "<|im_end|>"),
    "qwen3": (CHATML, "<|im_end|>"),
    "qwen3_5": (CHATML, "<|im_end|>"),
    "qwen_25": (CHATML, "<|im_end|>"),
}
TEMPLATE_FOLDER = Path(__file__).parent / "chat_templates"
for _name, (_markers, _end) in FILE_TEMPLATES.items():
    NAMED_TEMPLATES[_name] = NamedTemplate((TEMPLATE_FOLDER / f"{_name}.jinja").read_text(encoding="utf-8"), _markers, _end)

# End-of-turn markers of common templates, tried when the template is not a named one (those the
# template's text contains, plus EOS when it writes it).
KNOWN_END_OF_TURN = (
    "<|im_end|>", "<|eot_id|>", "<|eot|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>", "<|end▁of▁sentence|>",
    "<|return|>", "<|endoftext|>", "</s>",
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_blocks(source: str) -> bool:
    """True when the template marks assistant output with {% generation %} (transformers' assistant mask)."""
    return bool(_GENERATION_TAG.search(source))


def _single_token(tokenizer: Any, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def _fix_list() -> str:
    return f"tokenizer_default, {FALLBACK_PREFIX}NAME, one of {', '.join(NAMED_TEMPLATES)}, jinja (with chat_template_jinja) or a Jinja template string"


def named_choice(setting: str | None, tokenizer: Any) -> str | None:
    """The named template a `chat_template:` value ends up using, if any."""
    if setting and setting.startswith(FALLBACK_PREFIX):
        return None if getattr(tokenizer, "chat_template", None) else setting[len(FALLBACK_PREFIX):]
    return setting if setting in NAMED_TEMPLATES else None


def _read_jinja(jinja: str | None, where: str) -> str:
    if not jinja:
        raise LmforgeError("chat_template: jinja needs the template", where=where, fix="set chat_template_jinja: to the Jinja text or a .jinja file")
    if "{" not in jinja and os.path.isfile(os.path.expanduser(jinja)):  # axolotl: a path to a file also works
        with open(os.path.expanduser(jinja), encoding="utf-8") as handle:
            return handle.read()
    if "{" not in jinja:
        raise LmforgeError(f"chat_template_jinja is neither a Jinja template nor a file: {jinja}", where=where, fix="fix the path or give the template text")
    return jinja


def end_of_turn_candidates(source: str, tokenizer: Any) -> tuple[str, ...]:
    """Markers of common templates that this template writes, then EOS when it writes it."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    found = tuple(m for m in KNOWN_END_OF_TURN if m in source and m != eos)
    writes_eos = eos and (eos in source or "eos_token" in source)
    if writes_eos or not found:
        found += ((eos,) if eos else ())
    return found or KNOWN_END_OF_TURN


def resolve_template(
    setting: str | None, tokenizer: Any, where: str = "chat_template", jinja: str | None = None
) -> tuple[str, tuple[str, ...]]:
    """(Jinja source, end-of-turn candidates) for a `chat_template:` value."""
    eos = getattr(tokenizer, "eos_token", None)
    if setting and setting.startswith(FALLBACK_PREFIX):
        name = setting[len(FALLBACK_PREFIX):]
        if name not in NAMED_TEMPLATES:
            raise LmforgeError(f"unknown chat_template '{name}' after {FALLBACK_PREFIX}", where=where, fix=f"use one of {', '.join(NAMED_TEMPLATES)}")
        setting = "tokenizer_default" if getattr(tokenizer, "chat_template", None) else name
    if setting in (None, "", "tokenizer_default"):
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise LmforgeError("the tokenizer has no chat template", where=where, fix=f"set chat_template: to {_fix_list()}")
        if isinstance(source, dict):  # several named templates on one tokenizer
            source = source.get("default") or next(iter(source.values()))
        return source, end_of_turn_candidates(source, tokenizer)
    if setting in NAMED_TEMPLATES:
        named = NAMED_TEMPLATES[setting]
        missing = [m for m in named.markers if not _single_token(tokenizer, m)]
        if missing:
            raise LmforgeError(
                f"chat_template {setting} needs the tokens {', '.join(missing)}, which this tokenizer does not have",
                where=where,
                fix="training adds them (and saves them with the tokenizer in output_dir): load the tokenizer from there "
                "(--lora_model_dir or tokenizer_config), or use chat_template: tokenizer_default",
            )
        end = named.end_of_turn or eos
        if not end:
            raise LmforgeError(f"chat_template {setting} ends turns with eos_token, and the tokenizer has none", where=where, fix="set special_tokens: {eos_token: ...}")
        return named.source, (end,)
    if setting == "jinja":
        source = _read_jinja(jinja, where)
        return source, end_of_turn_candidates(source, tokenizer)
    if "{{" in setting or "{%" in setting:
        return setting, end_of_turn_candidates(setting, tokenizer)
    raise LmforgeError(f"unknown chat_template '{setting}'", where=where, fix=f"use {_fix_list()}")


def template_choices(data: Any) -> list[tuple[str | None, str | None, str]]:
    """(chat_template, chat_template_jinja, where) of every dataset entry, each with the top-level default."""
    out = [(data.chat_template, data.chat_template_jinja, "chat_template")]
    for key in ("datasets", "test_datasets"):
        for index, spec in enumerate(getattr(data, key, None) or []):
            if getattr(spec, "chat_template", None):
                out.append((spec.chat_template, spec.chat_template_jinja, f"{key}[{index}].chat_template"))
    return out


def prepare_chat_tokenizer(tokenizer: Any, data: Any) -> list[str]:
    """Make the training tokenizer carry what the configured chat templates need; returns the tokens it added.

    Named templates' marker tokens the tokenizer lacks become special tokens (the model then grows
    its embeddings to match), and a top-level template other than the tokenizer's own becomes
    ``tokenizer.chat_template``, so the tokenizer saved with the trained model renders prompts as
    training did.
    """
    if data is None:
        return []
    missing: list[str] = []
    for setting, _, _ in template_choices(data):
        name = named_choice(setting, tokenizer)
        if name is not None:
            missing += [m for m in NAMED_TEMPLATES[name].markers if m not in missing and not _single_token(tokenizer, m)]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    from lmforge.data.formats.chat import check_template

    for setting, jinja, where in template_choices(data):  # a bad name, file or template fails here, before the model loads
        if setting:
            source, _ = resolve_template(setting, tokenizer, where=where, jinja=jinja)
            check_template(source, where)
            if where == "chat_template" and setting != "tokenizer_default":
                tokenizer.chat_template = source
    return missing
