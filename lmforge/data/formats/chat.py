"""`type: chat_template`: OpenAI ``messages`` or ShareGPT ``conversations`` rendered with a chat template.

Templates render through transformers' own code (``render_jinja_template``: its sandboxed Jinja
environment with the ``{% generation %}`` extension, ``tojson``, ``raise_exception``,
``strftime_now``), with the tokenizer's special tokens and ``chat_template_kwargs`` as variables,
exactly as ``apply_chat_template`` does. The segments' concatenation is that rendering, and
``renders_special_tokens`` makes the tokenizer see that one string, so the token ids are exactly
those of ``apply_chat_template``.

Which characters are trained:
- a template with ``{% generation %}`` blocks marks them itself: they are the trained part, and
  the tokens overlapping them are exactly ``return_assistant_tokens_mask``'s (the keys below then
  only narrow or widen that: ``train_on_eot``/``train_on_eos``, ``train_on_thinking: false``,
  other ``roles_to_train``);
- otherwise each trained turn's content (found by rendering once with its contents marked, or by
  searching the rendering, or as a last resort by rendering every prefix and diffing, as axolotl
  and TRL do) is trained, from its reasoning when it has one, up to its end-of-turn token.
By default only assistant turns are trained.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field as dc_field
from functools import cached_property
from typing import Any

from lmforge.data.formats.base import Segment
from lmforge.errors import LmforgeError

# ShareGPT speaker names → OpenAI roles.
DEFAULT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool",
}
TRAIN_ON_EOS = ("turn", "all", "last", "none")
# axolotl's split_thinking: reasoning delimiters in assistant content, and an optional answer wrapper.
THINKING_PAIRS = (("<think>", "</think>"), ("<reasoning>", "</reasoning>"), ("<|begin_of_thought|>", "<|end_of_thought|>"))
ANSWER_PAIRS = (("<|begin_of_solution|>", "<|end_of_solution|>"),)
# Variables lmforge itself passes to the template; chat_template_kwargs cannot set them.
RESERVED_VARIABLES = ("messages", "add_generation_prompt", "continue_final_message", "return_assistant_tokens_mask", "chat_template", "conversations")
# Private-use characters (planes 15 and 16) wrapped around each message's content and reasoning for one
# rendering, numbered by message, to see exactly where each lands.
_MARK_SPAN = 0x8000
_CONTENT_OPEN, _CONTENT_CLOSE = 0xF0000, 0xF0000 + _MARK_SPAN
_THINKING_OPEN, _THINKING_CLOSE = 0x100000, 0x100000 + _MARK_SPAN
_MARK = re.compile("[\U000F0000-\U000FFFFF\U00100000-\U0010FFFF]")


def template_errors() -> tuple[type[Exception], ...]:
    """What rendering a template raises for a conversation it refuses (raise_exception, a bad variable...)."""
    from jinja2.exceptions import TemplateError

    return (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError)


def check_template(source: str, where: str) -> None:
    """Fail at setup, naming the key, for a template transformers cannot compile."""
    from jinja2.exceptions import TemplateSyntaxError
    from transformers.utils import chat_template_utils

    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    if compile_template is None:  # a transformers without it compiles on first use instead
        return
    try:
        compile_template(source)
    except TemplateSyntaxError as exc:
        raise LmforgeError(f"the chat template does not compile: {exc.message} (template line {exc.lineno})", where=where, fix="fix the Jinja template") from exc


@dataclass(frozen=True)
class ChatTemplateFormat:
    template: str
    end_of_turn: tuple[str, ...]
    variables: dict[str, Any] = dc_field(default_factory=dict)  # the tokenizer's special tokens, then chat_template_kwargs
    generation: bool = False  # the template has {% generation %} blocks
    field_messages: str | None = None  # None: `messages`, else `conversations`
    role_key: str | None = None  # None: `role` or ShareGPT's `from`
    content_key: str | None = None  # None: `content` or ShareGPT's `value`
    property_mappings: dict[str, str] = dc_field(default_factory=dict)  # other message keys the template reads ← turn keys
    roles: dict[str, str] = dc_field(default_factory=lambda: dict(DEFAULT_ROLES))
    roles_to_train: tuple[str, ...] = ("assistant",)
    train_on_eos: str = "turn"
    train_on_eot: str | None = None  # None: as train_on_eos
    field_thinking: str = "reasoning_content"
    thinking_key: str = "reasoning_content"
    split_thinking: bool = False
    train_on_thinking: bool = True
    drop_system_message: bool = False
    renders_special_tokens: bool = True
    keep_parts: bool = False  # content parts stay a list (mistral-common reads them); else their text is joined

    @property
    def eos_token(self) -> str:
        return self.variables.get("eos_token") or ""

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """Tokens that end a generated answer: the end-of-turn markers, then EOS."""
        return tuple(dict.fromkeys(t for t in (*self.end_of_turn, self.eos_token) if t))

    # -- rendering (transformers' own path) -----------------------------------------------------------

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = False, track: bool = False) -> tuple[str, list[tuple[int, int]]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=self.template, add_generation_prompt=generation_prompt,
            return_assistant_tokens_mask=track, **self.variables,
        )
        return texts[0], [tuple(span) for span in spans[0]] if track else []

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        """The template's text for `messages` (with `chat_template_kwargs`), as apply_chat_template renders it."""
        return self._render(messages, generation_prompt)[0]

    def prompt(self, instruction: str) -> str:
        return self.conversation_prompt([{"role": "user", "content": instruction}])

    def conversation_prompt(self, messages: list[dict[str, Any]]) -> str:
        """A conversation so far, ending with the header the model answers after (for chat and serving)."""
        return self.render(messages, generation_prompt=True)

    def _checked_render(self, messages: list[dict[str, Any]], where: str, track: bool = False) -> tuple[str, list[tuple[int, int]]]:
        try:
            return self._render(messages, track=track)
        except template_errors() as exc:
            raise LmforgeError(f"the chat template refused this conversation: {exc}", where=where) from exc

    def _try_render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str | None:
        try:
            return self.render(messages, generation_prompt)
        except template_errors():
            return None

    # -- reading a row -------------------------------------------------------------------------------

    def messages(self, row: dict[str, Any], where: str) -> list[dict[str, Any]]:
        name = self.field_messages or next((k for k in ("messages", "conversations") if k in row), "messages")
        turns = row.get(name)
        if isinstance(turns, str):  # stored as a JSON string
            try:
                turns = json.loads(turns)
            except (json.JSONDecodeError, RecursionError):  # not JSON (or nested past reading): named below
                pass
        if not isinstance(turns, list):
            present = ", ".join(sorted(map(str, row))) or "none"
            problem = "is missing" if name not in row else "is not a list"
            raise LmforgeError(f"field '{name}' {problem} (columns present: {present})", where=where, fix="set field_messages to the column holding the turns")
        if not turns:
            raise LmforgeError(f"field '{name}' holds no turns", where=where,
                               fix="give each row at least one turn, or set skip_bad_rows: true to skip and count such rows")
        return self.normalize(turns, where)

    def normalize(self, turns: list[Any], where: str) -> list[dict[str, Any]]:
        """Turns (OpenAI or ShareGPT keys, mapped names) as the messages the template reads."""
        messages = [self._message(turn, n, where) for n, turn in enumerate(turns)]
        if self.drop_system_message and messages and messages[0]["role"] == "system":
            messages = messages[1:]
        if not messages:
            raise LmforgeError("the conversation holds only a system turn, which drop_system_message removed", where=where)
        return messages

    def _message(self, turn: Any, number: int, where: str) -> dict[str, Any]:
        if not isinstance(turn, dict):
            raise LmforgeError(f"turn {number} is not an object", where=where)
        role_key = self.role_key or ("role" if "role" in turn else "from")
        content_key = self.content_key or ("content" if "content" in turn else "value")
        if role_key not in turn or content_key not in turn:
            keys = ", ".join(sorted(map(str, turn)))
            raise LmforgeError(
                f"turn {number} has no '{role_key}'/'{content_key}' (keys present: {keys})", where=where,
                fix="set message_property_mappings: {role: ..., content: ...}",
            )
        speaker = str(turn[role_key])
        role = self.roles.get(speaker, speaker if speaker in self.roles.values() else None)
        if role is None:
            raise LmforgeError(
                f"turn {number} has unknown role '{speaker}'", where=where,
                fix=f"map it under roles: (known: {', '.join(sorted(self.roles))})",
            )
        content = turn[content_key]
        keep = self.keep_parts and isinstance(content, list) and all(isinstance(part, dict) for part in content)
        message: dict[str, Any] = {"role": role, "content": content if keep else _text(content)}
        for key, source in self.property_mappings.items():
            if turn.get(source) is not None:
                message[key] = turn[source]
        thinking = turn.get(self.field_thinking)
        if thinking is not None:
            message[self.thinking_key] = _text(thinking)
        if self.split_thinking and role == "assistant":
            _split_thinking(message, self.thinking_key)
        return message

    # -- segments ------------------------------------------------------------------------------------

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        return self.conversation_segments(self.messages(row, where), where)

    def conversation_segments(self, messages: list[dict[str, Any]], where: str) -> list[Segment]:
        """Segments whose concatenation is exactly the rendering of the whole conversation."""
        full, spans = self._checked_render(messages, where, track=self.generation)
        places = self._locate(full, messages)
        if self.generation:
            trained = self._generation_mask(full, spans, messages, places)
        elif places is None:
            return self.prefix_segments(messages, where)
        else:
            trained = self._search_mask(full, messages, places)
        return _runs(full, trained)

    def _locate(self, full: str, messages: list[dict[str, Any]]) -> list[dict[str, tuple[int, int]]] | None:
        """Where each message's content (and reasoning) lands in `full`, or None when that cannot be told.

        First one rendering with every content's stripped core wrapped in private-use marks: exact
        whenever the marks do not change what the template renders (it tests or rewrites the
        content). Otherwise search each content in order, which trusts that no content occurs
        first in template text. Either way a content's place is its stripped core.
        """
        found = self._locate_marked(full, messages)
        return found if found is not None else self._locate_by_search(full, messages)

    def _locate_marked(self, full: str, messages: list[dict[str, Any]]) -> list[dict[str, tuple[int, int]]] | None:
        if _MARK.search(full) or len(messages) >= _MARK_SPAN:
            return None
        marked = []
        for i, message in enumerate(messages):
            copy = dict(message, content=_marked(message["content"], _CONTENT_OPEN + i, _CONTENT_CLOSE + i))
            if isinstance(message.get(self.thinking_key), str):
                copy[self.thinking_key] = _marked(message[self.thinking_key], _THINKING_OPEN + i, _THINKING_CLOSE + i)
            marked.append(copy)
        rendered = self._try_render(marked)
        if rendered is None:
            return None
        places: list[dict[str, tuple[int, int]]] = [{} for _ in messages]
        opened: dict[tuple[str, int], int] = {}
        pieces: list[str] = []
        cursor = length = 0
        for match in _MARK.finditer(rendered):
            pieces.append(rendered[cursor:match.start()])
            length += match.start() - cursor
            cursor = match.end()
            code = ord(match.group())
            name = "content" if code < _THINKING_OPEN else "thinking"
            base = _CONTENT_OPEN if name == "content" else _THINKING_OPEN
            number, closing = (code - base) % _MARK_SPAN, code - base >= _MARK_SPAN
            if not closing:
                if (name, number) in opened or name in places[number]:
                    return None  # rendered twice: ambiguous
                opened[(name, number)] = length
            elif (name, number) in opened:
                places[number][name] = (opened.pop((name, number)), length)
            else:
                return None
        pieces.append(rendered[cursor:])
        if opened or "".join(pieces) != full:
            return None  # the marks changed what the template renders
        return places  # a turn the template leaves out (Mistral's system turn, at times) has no place

    def _locate_by_search(self, full: str, messages: list[dict[str, Any]]) -> list[dict[str, tuple[int, int]]] | None:
        places: list[dict[str, tuple[int, int]]] = []
        cursor = 0
        for message in messages:
            place: dict[str, tuple[int, int]] = {}
            thinking = message.get(self.thinking_key)
            content = message["content"].strip()
            at = full.find(content, cursor) if content else cursor
            if at < 0:
                return None
            if isinstance(thinking, str) and thinking.strip():
                t = full.find(thinking.strip(), cursor)
                if 0 <= t and t + len(thinking.strip()) <= at:
                    place["thinking"] = (t, t + len(thinking.strip()))
            place["content"] = (at, at + len(content))
            cursor = at + len(content)
            places.append(place)
        return places

    # -- which characters are trained ------------------------------------------------------------------

    def _eot_rule(self, setting: str, trained_turn: bool, is_last: bool) -> bool:
        return setting == "all" or (setting == "turn" and trained_turn) or (setting == "last" and is_last)

    @property
    def _eot_setting(self) -> str:
        return self.train_on_eot or self.train_on_eos

    def _end_after(self, full: str, start: int, stop: int) -> tuple[int, str] | None:
        """The first end-of-turn marker in full[start:stop]."""
        hits = [(full.find(m, start, stop), m) for m in self.end_of_turn if m]
        hits = [(pos, m) for pos, m in hits if pos >= 0]
        return min(hits) if hits else None

    def _mark_end(self, full: str, trained: bytearray, content_end: int, stop: int, trained_turn: bool, is_last: bool) -> None:
        """Train (or not) the text up to a turn's end-of-turn marker, the marker, and an EOS right after it."""
        end = self._end_after(full, content_end, stop)
        if end is None:
            return
        pos, marker = end
        if trained_turn:
            trained[content_end:pos] = b"\1" * (pos - content_end)
        eos = self.eos_token
        setting = self.train_on_eos if marker == eos else self._eot_setting
        trained[pos:pos + len(marker)] = (b"\1" if self._eot_rule(setting, trained_turn, is_last) else b"\0") * len(marker)
        after = pos + len(marker)
        gap = len(full[after:stop]) - len(full[after:stop].lstrip())
        if eos and marker != eos and full.startswith(eos, after + gap) and after + gap + len(eos) <= stop:
            flag = b"\1" if self._eot_rule(self.train_on_eos, trained_turn, is_last) else b"\0"
            trained[after + gap:after + gap + len(eos)] = flag * len(eos)

    @cached_property
    def _assistant_header(self) -> str:
        """What follows a user turn's end-of-turn token before an answer (e.g. '<|im_start|>assistant\\n')."""
        probe = chr(_CONTENT_OPEN)
        rendered = self._try_render([{"role": "user", "content": probe}], True)
        if rendered is None or probe not in rendered:
            return ""
        tail = rendered[rendered.index(probe) + 1:]
        end = self._end_after(tail, 0, len(tail))
        return tail[end[0] + len(end[1]):] if end is not None else tail

    def _answer_start(self, full: str, region_start: int, thinking_start: int) -> int:
        """Where a trained turn with reasoning starts: after its header, so '<think>' is trained too."""
        region = full[region_start:thinking_start]
        header = self._assistant_header
        at = region.rfind(header) if header.strip() else -1
        if at >= 0:
            return region_start + at + len(header)
        for opening, _ in THINKING_PAIRS:
            at = region.rfind(opening)
            if at >= 0 and not region[at + len(opening):].strip():
                return region_start + at
        return thinking_start

    def _search_mask(self, full: str, messages: list[dict[str, Any]], places: list[dict[str, tuple[int, int]]]) -> bytearray:
        trained = bytearray(len(full))
        flags = [m["role"] in self.roles_to_train for m in messages]
        last = max((i for i, f in enumerate(flags) if f), default=-1)
        for i, place in enumerate(places):
            if "content" not in place:
                continue
            start, end = place["content"]
            if flags[i]:
                if "thinking" in place and self.train_on_thinking:
                    thinking = place["thinking"][0]
                    before = max((p["content"][1] for p in places if "content" in p and p["content"][1] <= thinking), default=0)
                    start = self._answer_start(full, before, thinking)
                trained[start:end] = b"\1" * (end - start)
            self._mark_end(full, trained, end, _next_start(places, end, len(full)), flags[i], i == last)
        return trained

    def _generation_mask(
        self, full: str, spans: list[tuple[int, int]], messages: list[dict[str, Any]], places: list[dict[str, tuple[int, int]]] | None
    ) -> bytearray:
        trained = bytearray(len(full))
        assistant = "assistant" in self.roles_to_train
        if assistant:
            for start, end in spans:
                trained[start:end] = b"\1" * (end - start)
        if places is not None:
            for message, place in zip(messages, places):
                if "content" not in place:
                    continue
                start, end = place["content"]
                stop = _next_start(places, end, len(full))
                if message["role"] == "assistant":
                    span = next((s for s in spans if s[0] <= start <= s[1]), None)
                    if assistant and span is not None and "thinking" in place and not self.train_on_thinking:
                        trained[span[0]:start] = b"\0" * (start - span[0])
                    continue
                if message["role"] in self.roles_to_train:
                    trained[start:end] = b"\1" * (end - start)
                if message["role"] in self.roles_to_train or self._eot_setting == "all" or self.train_on_eos == "all":
                    self._mark_end(full, trained, end, stop, message["role"] in self.roles_to_train, False)
        elif not self.train_on_thinking and assistant:
            for message in messages:  # no content places: untrain the reasoning text itself where found
                thinking = message.get(self.thinking_key)
                at = full.find(thinking.strip()) if isinstance(thinking, str) and thinking.strip() else -1
                if at >= 0:
                    trained[at:at + len(thinking.strip())] = b"\0" * len(thinking.strip())
        if assistant and (self._eot_setting != "turn" or self.train_on_eos != "turn"):
            for number, (start, end) in enumerate(spans):
                self._retrain_span_end(full, trained, start, end, number == len(spans) - 1)
        return trained

    def _retrain_span_end(self, full: str, trained: bytearray, start: int, end: int, is_last: bool) -> None:
        """Apply train_on_eot / train_on_eos to the end-of-turn marker (and EOS) inside a generation block."""
        eos = self.eos_token
        for marker in self.end_of_turn:
            pos = full.rfind(marker, start, end) if marker else -1
            if pos >= 0:
                setting = self.train_on_eos if marker == eos else self._eot_setting
                trained[pos:pos + len(marker)] = (b"\1" if self._eot_rule(setting, True, is_last) else b"\0") * len(marker)
        if eos and eos not in self.end_of_turn:
            pos = full.rfind(eos, start, end)
            if pos >= 0:
                trained[pos:pos + len(eos)] = (b"\1" if self._eot_rule(self.train_on_eos, True, is_last) else b"\0") * len(eos)

    def prefix_segments(self, messages: list[dict[str, Any]], where: str) -> list[Segment]:
        """Segments by rendering each conversation prefix and diffing (as axolotl and TRL do)."""
        flags = [m["role"] in self.roles_to_train for m in messages]
        last = max((i for i, f in enumerate(flags) if f), default=-1)
        out: list[Segment] = []
        prev = ""
        for i, message in enumerate(messages):
            if i == len(messages) - 1:
                full = self._checked_render(messages, where)[0]
            else:
                full = self._try_render(messages[: i + 1])
                if full is None:  # e.g. a system turn the template folds into the next user turn
                    continue
            if not full.startswith(prev):
                raise LmforgeError(
                    "the chat template renders a conversation prefix differently from the whole, so turns cannot be masked",
                    where=where, fix="use a template whose rendering only appends per turn (e.g. chat_template: chatml), "
                    "or one with {% generation %} blocks",
                )
            piece = full[len(prev):]
            trained = bytearray(len(piece))
            stripped = message["content"].strip()
            at = piece.find(stripped) if stripped else -1
            content_end = at + len(stripped) if at >= 0 else 0
            if flags[i]:
                start = 0
                generation = self._try_render(messages[:i], generation_prompt=True) if i else None
                if generation is not None and generation.startswith(prev) and full.startswith(generation):
                    start = len(generation) - len(prev)
                elif at > 0:
                    start = at
                if (not self.train_on_thinking and message.get(self.thinking_key)) and at > start:
                    start = at
                trained[start:] = b"\1" * (len(piece) - start)
                end = self._end_after(piece, content_end, len(piece))
                if end is not None:
                    trained[end[0]:] = b"\0" * (len(piece) - end[0])
            self._mark_end(piece, trained, content_end, len(piece), flags[i], i == last)
            out += [s for s in _runs(piece, trained) if s.text]
            prev = full
        return out


def _text(value: Any) -> str:
    """A content value as text: strings as they are, content parts (``[{type: text, text: ...}]``) joined."""
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(part, dict) for part in value):
        return "".join(str(part.get("text") or part.get("content") or part.get("value") or "") for part in value)
    return value if isinstance(value, str) else str(value)


def _split_thinking(message: dict[str, Any], thinking_key: str) -> None:
    """axolotl's split_thinking: move the first <think>...</think> (or similar) out of the content."""
    content = message["content"]
    for opening, closing in THINKING_PAIRS:
        if opening in content and closing in content:
            start, end = content.find(opening), content.find(closing)
            message[thinking_key] = content[start + len(opening):end].strip()
            rest = content[end + len(closing):].lstrip()
            for answer_open, answer_close in ANSWER_PAIRS:
                if answer_open in rest and answer_close in rest:
                    rest = rest[rest.find(answer_open) + len(answer_open):rest.find(answer_close)].strip()
                    break
            message["content"] = rest
            return


def _marked(text: str, opening: int, closing: int) -> str:
    """`text` with marks around its stripped core, so a template that trims it still renders the same text."""
    core = text.strip()
    at = text.find(core) if core else len(text)
    return text[:at] + chr(opening) + core + chr(closing) + text[at + len(core):]


def _next_start(places: list[dict[str, tuple[int, int]]], after: int, default: int) -> int:
    """Where the next located content or reasoning after position `after` starts (the end of a turn's tail)."""
    return min((span[0] for place in places for span in place.values() if span[0] > after), default=default)


def _runs(text: str, trained: bytearray) -> list[Segment]:
    """Segments of `text`, one per run of equally trained characters."""
    return [Segment(text[m.start():m.end()], m.group()[0] == 1) for m in re.finditer(rb"\x00+|\x01+", bytes(trained))]
