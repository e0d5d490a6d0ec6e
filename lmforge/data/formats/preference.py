"""Preference dataset types (`rl:`): each turns one row into (prompt, chosen, rejected) texts, or, for KTO,
(prompt, completion, desirable).

The types and their meaning are axolotl's (src/axolotl/prompt_strategies/dpo/ and kto/):

- ``chat_template.default``: ``messages`` (the prompt turns, rendered by the chat template with the
  generation prompt), ``chosen`` / ``rejected`` as assistant messages (a dict, a list whose last turn is
  the answer, or a string); ``field_messages``, ``field_chosen``, ``field_rejected``,
  ``message_property_mappings`` and ``roles`` rename the columns. Each answer is the template's
  rendering of that assistant turn (so it ends with the end-of-turn token);
- ``chatml.*`` / ``llama3.*`` (``default``, ``intel``, ``icr``, ``prompt_pairs``, ``ultra``,
  ``argilla_chat``): fixed ChatML / Llama-3 wrappings of the columns each dataset family uses;
- ``zephyr.nectar``: Nectar's ranked ``answers``, best against second best;
- ``user_defined.default`` (a ``type:`` mapping with ``field_prompt`` / ``field_chosen`` ...): the
  columns through ``prompt_format`` / ``chosen_format`` / ``rejected_format``;
- KTO (``rl: kto``): the same families with ``completion`` and ``label`` (True: desirable).

A format knows no token ids; lmforge.data.preference tokenizes, truncates and checks the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.data.formats.base import field
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class PreferenceText:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class CompletionText:
    """One KTO row: a prompt, an answer, and whether the answer is desirable."""

    prompt: str
    completion: str
    desirable: bool


RowFormat = Callable[[dict[str, Any], str], Any]  # (row, where) -> PreferenceText | CompletionText

CHATML = ("<|im_start|>system\n{system}<|im_end|>\n", "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>")
LLAMA3 = ("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
          "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
          "<|eot_id|>")
WRAPPERS = {"chatml": CHATML, "llama3": LLAMA3}


def _first(row: dict[str, Any], names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in row:
            return name
    return names[-1] if names else ""  # missing: the field lookup names it with the columns present


def _answer(value: Any, where: str, name: str) -> str:
    """An answer given as text, a message dict, or a conversation whose last turn is the answer."""
    if isinstance(value, dict):
        value = value.get("content")
    elif isinstance(value, list) and value:
        last = value[-1]
        value = last.get("content") if isinstance(last, dict) else last
    if not isinstance(value, str) or not value.strip():
        raise LmforgeError(f"'{name}' is empty or not an answer (text, a message, or a conversation)", where=where,
                           fix="give every row a non-empty chosen and rejected answer")
    return value


def _wrapped(family: str, variant: str, completion: bool) -> RowFormat:
    """axolotl's fixed ChatML / Llama-3 wrappings: which columns hold the prompt and the answers, per variant."""
    system_wrap, prompt_wrap, end = WRAPPERS[family]
    prompt_names = {"default": ("prompt", "input", "question", "instruction"), "intel": ("question",), "icr": ("input",),
                    "prompt_pairs": ("prompt",), "ultra": ("prompt",), "argilla": ("instruction",)}.get(variant)
    answers = ("completion",) if completion else ("chosen", "rejected")

    def fmt(row: dict[str, Any], where: str) -> Any:
        if variant == "argilla_chat":  # the prompt is the first turn of the answer's conversation
            conversation = row.get(answers[0])
            if not isinstance(conversation, list) or len(conversation) < 2:
                raise LmforgeError(f"'{answers[0]}' must be a conversation [user turn, assistant turn]", where=where,
                                   fix="use chat_template.default for other layouts")
            user = conversation[0]["content"] if isinstance(conversation[0], dict) else str(conversation[0])
        else:
            user = field(row, _first(row, prompt_names or ("prompt",), where), where)
        prompt = prompt_wrap.format(prompt=user)
        if row.get("system"):
            prompt = system_wrap.format(system=row["system"]) + prompt
        texts = []
        for name in answers:
            key = name if name in row or variant != "default" else f"{name}_response"
            if key not in row:
                field(row, name, where)  # names the missing column
            texts.append(_answer(row[key], where, name) + end)
        if completion:
            return CompletionText(prompt, texts[0], _label(row, where))
        return PreferenceText(prompt, texts[0], texts[1])

    return fmt


def _label(row: dict[str, Any], where: str, name: str = "label") -> bool:
    value = row.get(name)
    if not isinstance(value, bool):
        raise LmforgeError(f"'{name}' must be true (desirable) or false (undesirable), got {value!r}", where=where,
                           fix=f"give every KTO row a boolean {name}")
    return value


def _nectar(row: dict[str, Any], where: str) -> PreferenceText:
    answers = row.get("answers")
    if not isinstance(answers, list) or len(answers) < 2:
        raise LmforgeError("'answers' must list at least two ranked answers", where=where, fix="fix the row")
    ranked = sorted(answers, key=lambda a: a["rank"])
    # axolotl's zephyr.nectar: the last two after sorting by rank
    prompt = f"<|system|>\n</s>\n<|user|>\n{field(row, 'prompt', where)}</s>\n<|assistant|>\n"
    return PreferenceText(prompt, _answer(ranked[-1]["answer"], where, "answers"), _answer(ranked[-2]["answer"], where, "answers"))


def _user_defined(mapping: Any, completion: bool) -> RowFormat:
    prompt_name = mapping.field_prompt or "prompt"
    system_name = mapping.field_system or "system"
    prompt_format = mapping.prompt_format or "{prompt}"
    chosen_name, rejected_name = mapping.field_chosen or "chosen", mapping.field_rejected or "rejected"
    chosen_format, rejected_format = mapping.chosen_format or "{chosen}", mapping.rejected_format or "{rejected}"

    def fmt(row: dict[str, Any], where: str) -> Any:
        values = {"prompt": field(row, prompt_name, where)}
        if "{system}" in prompt_format:
            values["system"] = str(row.get(system_name) or "")
        prompt = prompt_format.format(**values)
        if completion:
            return CompletionText(prompt, field(row, "completion", where), _label(row, where))
        return PreferenceText(prompt, chosen_format.format(chosen=field(row, chosen_name, where)),
                              rejected_format.format(rejected=field(row, rejected_name, where)))

    return fmt


def _chat_template(spec: Any, tokenizer: Any, template: str, completion: bool) -> RowFormat:
    """axolotl's chat_template.default: the prompt turns rendered with the generation prompt; each answer as the
    template renders an assistant turn (found after a placeholder user turn), right-stripped."""
    messages_name = getattr(spec, "field_messages", None) or "messages"
    chosen_name = getattr(spec, "field_chosen", None) or "chosen"
    rejected_name = getattr(spec, "field_rejected", None) or "rejected"
    mappings = dict(getattr(spec, "message_property_mappings", None) or {})
    role_key, content_key = mappings.get("role", "role"), mappings.get("content", "content")
    roles: dict[str, str] = {}
    for target, sources in (getattr(spec, "roles", None) or {}).items():
        for source in [sources] if isinstance(sources, str) else sources:
            roles[source] = target

    def message(value: Any, where: str, name: str) -> dict[str, str]:
        if isinstance(value, str):
            return {"role": "assistant", "content": value}
        if isinstance(value, list) and value:
            value = value[-1]
        if not isinstance(value, dict) or not isinstance(value.get(content_key), str):
            raise LmforgeError(f"'{name}' must be an assistant message {{{role_key}, {content_key}}}, a list ending in one, "
                               "or text", where=where, fix="fix the row, or map the keys with message_property_mappings")
        role = value.get(role_key, "assistant")
        return {"role": roles.get(role, role), "content": value[content_key]}

    def answer(reply: dict[str, str], where: str, name: str) -> str:
        if not reply["content"].strip():
            raise LmforgeError(f"'{name}' is empty", where=where, fix="give every row a non-empty chosen and rejected answer")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "[[dummy_message]]"}, reply],
                                                 chat_template=template, tokenize=False, add_generation_prompt=False)
        start = rendered.find(reply["content"])
        return rendered[start:].rstrip() if start >= 0 else reply["content"]

    def fmt(row: dict[str, Any], where: str) -> Any:
        turns = row.get(messages_name)
        if isinstance(turns, str):
            turns = [{role_key: "user", content_key: turns}]
        if not isinstance(turns, list) or not turns:
            field(row, messages_name, where)  # names the missing column
            raise LmforgeError(f"'{messages_name}' must be a list of prompt turns", where=where, fix="fix the row")
        try:
            prompt_turns = [{"role": roles.get(t[role_key], t[role_key]), "content": t[content_key]} for t in turns]
        except (KeyError, TypeError) as exc:
            raise LmforgeError(f"a turn of '{messages_name}' lacks {exc}", where=where,
                               fix="map the keys with message_property_mappings") from exc
        prompt = tokenizer.apply_chat_template(prompt_turns, chat_template=template, tokenize=False, add_generation_prompt=True)
        if completion:
            if "completion" not in row:
                field(row, "completion", where)
            return CompletionText(prompt, answer(message(row["completion"], where, "completion"), where, "completion"),
                                  _label(row, where))
        for name in (chosen_name, rejected_name):
            if name not in row:
                field(row, name, where)  # one line naming the missing column and those present
        return PreferenceText(prompt, answer(message(row[chosen_name], where, chosen_name), where, chosen_name),
                              answer(message(row[rejected_name], where, rejected_name), where, rejected_name))

    return fmt


def _bradley_terry(chat: RowFormat) -> RowFormat:
    """axolotl's bradley_terry.chat_template (its reward-model rows): `system` (optional) and `input` are the prompt
    turns, `chosen` and `rejected` the assistant's answers, all rendered with the chat template."""

    def fmt(row: dict[str, Any], where: str) -> Any:
        turns = [{"role": "user", "content": field(row, "input", where)}]
        if row.get("system"):
            turns.insert(0, {"role": "system", "content": str(row["system"])})
        return chat({"messages": turns, "chosen": field(row, "chosen", where), "rejected": field(row, "rejected", where)}, where)

    return fmt


def _argilla_conversations(chat: RowFormat) -> RowFormat:
    """axolotl's chat_template.argilla (its ORPO rows, UltraFeedback as Argilla binarized it): `chosen` and
    `rejected` are whole conversations [user, assistant, ...] sharing every turn but the last answer; an optional
    `system` opens the prompt, and an optional `prompt` column stands in for every user turn, as axolotl reads it.
    The prompt turns and both answers are then rendered as chat_template.default renders them."""

    def fmt(row: dict[str, Any], where: str) -> Any:
        conversations = {}
        for name in ("chosen", "rejected"):
            field(row, name, where)  # names a missing column
            turns = row[name]
            if (not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2
                    or not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns)):
                raise LmforgeError(f"'{name}' must be a conversation of [user, assistant] turn pairs with 'content'",
                                   where=where, fix="fix the row, or use chat_template.default for prompt/answer columns")
            conversations[name] = turns
        chosen = conversations["chosen"]
        prompt = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
        pairs = len(chosen) // 2
        for i in range(pairs):
            prompt.append({"role": "user", "content": row["prompt"] if "prompt" in row else chosen[2 * i]["content"]})
            if i < pairs - 1:
                prompt.append({"role": "assistant", "content": chosen[2 * i + 1]["content"]})
        answers = {name: {"role": "assistant", "content": turns[-1]["content"]} for name, turns in conversations.items()}
        return chat({"messages": prompt, **answers}, where)

    return fmt


# The types rendered with the config's chat template (the others wrap their columns in fixed ChatML / Llama-3 text)
CHAT_TEMPLATE_TYPES = ("chat_template", "chat_template.default", "chat_template.argilla", "bradley_terry.chat_template")
VARIANTS = ("default", "intel", "icr", "prompt_pairs", "ultra", "argilla_chat", "argilla")
PREFERENCE_TYPES = ("chat_template.default", "chat_template.argilla", "bradley_terry.chat_template", "zephyr.nectar", "user_defined.default",
                    *(f"{family}.{variant}" for family in WRAPPERS for variant in VARIANTS if variant != "argilla"))
KTO_TYPES = ("chat_template.default", "user_defined.default",
             *(f"{family}.{variant}" for family in WRAPPERS for variant in ("argilla", "argilla_chat", "intel", "prompt_pairs", "ultra")))


def preference_format(kind: Any, where: str, *, spec: Any, tokenizer: Any, template: str | None, completion: bool) -> RowFormat:
    """The row format of a preference dataset's `type:` (`completion`: KTO's labelled single answers)."""
    if not isinstance(kind, str):  # a mapping: axolotl's user_defined.default
        return _user_defined(kind, completion)
    known = KTO_TYPES if completion else PREFERENCE_TYPES
    if kind == "chat_template":
        kind = "chat_template.default"
    if kind not in known:
        raise LmforgeError(f"unknown {'KTO' if completion else 'preference'} dataset type '{kind}'", where=where,
                           fix=f"use one of: {', '.join(known)}, or a mapping with field_prompt/field_chosen/field_rejected")
    if kind in CHAT_TEMPLATE_TYPES:
        if template is None:
            raise LmforgeError(f"{kind} needs a chat template", where=where,
                               fix="set chat_template (tokenizer_default uses the model's own)")
        if kind == "bradley_terry.chat_template":
            return _bradley_terry(_chat_template(None, tokenizer, template, completion))
        if kind == "chat_template.argilla":
            return _argilla_conversations(_chat_template(None, tokenizer, template, completion))
        return _chat_template(spec, tokenizer, template, completion)
    if kind == "zephyr.nectar":
        return _nectar
    if kind == "user_defined.default":
        mapping = spec.type if not isinstance(spec.type, str) else None
        if mapping is None:
            raise LmforgeError("user_defined.default needs its fields as a `type:` mapping", where=where,
                               fix="write type: {field_prompt: ..., field_chosen: ..., field_rejected: ...}")
        return _user_defined(mapping, completion)
    family, variant = kind.split(".", 1)
    return _wrapped(family, variant, completion)
