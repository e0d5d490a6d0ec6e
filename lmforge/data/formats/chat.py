"""`type: chat_template`: OpenAI ``messages`` or ShareGPT ``conversations`` rendered with a chat template.

Segments come from rendering the template on growing prefixes of the conversation and taking
the difference (as axolotl and TRL do), so their concatenation is exactly the full rendering;
``renders_special_tokens`` makes the tokenizer see that one string, so the token ids are exactly
those of ``apply_chat_template``. Each trained turn is split into its header (e.g.
``<|im_start|>assistant\\n``, not trained), its content and end-of-turn token (trained), and any
text after that token (not trained). By default only assistant turns are trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmforge.data.formats.base import Segment
from lmforge.errors import LmforgeError

# ShareGPT speaker names → OpenAI roles.
DEFAULT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system", "tool": "tool",
}
TRAIN_ON_EOS = ("turn", "all", "last", "none")


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """A template compiled the way transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    import json

    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplateFormat:
    template: str
    end_of_turn: tuple[str, ...]
    bos_token: str = ""
    eos_token: str = ""
    field_messages: str | None = None  # None: `messages`, else `conversations`
    role_key: str | None = None  # None: `role` or ShareGPT's `from`
    content_key: str | None = None  # None: `content` or ShareGPT's `value`
    roles: dict[str, str] = dc_field(default_factory=lambda: dict(DEFAULT_ROLES))
    roles_to_train: tuple[str, ...] = ("assistant",)
    train_on_eos: str = "turn"
    renders_special_tokens: bool = True

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return compile_template(self.template).render(
            messages=messages, add_generation_prompt=generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token
        )

    # -- reading a row -------------------------------------------------------------------------------

    def messages(self, row: dict[str, Any], where: str) -> list[dict[str, str]]:
        name = self.field_messages or next((k for k in ("messages", "conversations") if k in row), "messages")
        turns = row.get(name)
        if not isinstance(turns, list):
            present = ", ".join(sorted(map(str, row))) or "none"
            problem = "is missing" if name not in row else "is not a list"
            raise LmforgeError(f"field '{name}' {problem} (columns present: {present})", where=where, fix="set field_messages to the column holding the turns")
        if not turns:
            raise LmforgeError(f"field '{name}' holds no turns", where=where)
        return [self._message(turn, n, where) for n, turn in enumerate(turns)]

    def _message(self, turn: Any, number: int, where: str) -> dict[str, str]:
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
        return {"role": role, "content": "" if content is None else str(content)}

    # -- segments ------------------------------------------------------------------------------------

    def segments(self, row: dict[str, Any], where: str) -> list[Segment]:
        return self.conversation_segments(self.messages(row, where), where)

    def _try_render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str | None:
        from jinja2.exceptions import TemplateError

        try:
            return self.render(messages, generation_prompt)
        except TemplateError:
            return None

    def _split_end(self, body: str, content: str) -> tuple[int, str] | None:
        """Where the end-of-turn marker after the content starts in body, and which marker it is."""
        stripped = content.strip()
        at = body.find(stripped) if stripped else 0
        after = at + len(stripped) if at >= 0 else 0
        hits = [(body.find(marker, after), marker) for marker in self.end_of_turn if marker]
        hits = [(pos, marker) for pos, marker in hits if pos >= 0]
        return min(hits) if hits else None

    def conversation_segments(self, messages: list[dict[str, str]], where: str) -> list[Segment]:
        """Segments whose concatenation is exactly the rendering of the whole conversation.

        Fast path: render once and find each message's content in order (linear in the turns).
        When a content is not found verbatim (a template that rewrites it), fall back to
        rendering every prefix and diffing (quadratic, but template-agnostic).
        """
        from jinja2.exceptions import TemplateError

        try:
            full = self.render(messages)
        except TemplateError as exc:
            raise LmforgeError(f"the chat template refused this conversation: {exc}", where=where) from exc
        found = self._segments_by_search(full, messages)
        return found if found is not None else self.prefix_segments(messages, where)

    def _segments_by_search(self, full: str, messages: list[dict[str, str]]) -> list[Segment] | None:
        trained = [m["role"] in self.roles_to_train for m in messages]
        last_trained = max((i for i, t in enumerate(trained) if t), default=-1)
        pieces: list[tuple[str, bool]] = []
        cursor = 0
        for i, message in enumerate(messages):
            content = message["content"].strip()
            at = full.find(content, cursor) if content else -1
            if content and at < 0:
                return None
            if not content:
                at = cursor
            end = at + len(content)
            pieces.append((full[cursor:at], False))
            pieces.append((full[at:end], trained[i]))
            cursor = end
            # The end-of-turn marker: the first one before the next message's content.
            hits = [(full.find(m, end), m) for m in self.end_of_turn if m]
            hits = [(pos, m) for pos, m in hits if pos >= 0]
            if hits:
                pos, marker = min(hits)
                nxt = messages[i + 1]["content"].strip() if i + 1 < len(messages) else ""
                if not nxt or full.find(nxt, end) < 0 or pos < full.find(nxt, end):
                    eos = (self.train_on_eos in ("turn", "all") and trained[i]) or self.train_on_eos == "all" or (
                        self.train_on_eos == "last" and i == last_trained
                    )
                    pieces.append((full[end:pos], trained[i]))
                    pieces.append((marker, eos))
                    cursor = pos + len(marker)
        pieces.append((full[cursor:], False))
        return [Segment(text, train) for text, train in pieces if text]

    def prefix_segments(self, messages: list[dict[str, str]], where: str) -> list[Segment]:
        """Segments by rendering each conversation prefix and diffing (as axolotl and TRL do)."""
        from jinja2.exceptions import TemplateError

        trained = [m["role"] in self.roles_to_train for m in messages]
        last_trained = max((i for i, t in enumerate(trained) if t), default=-1)
        out: list[Segment] = []
        prev = ""
        for i, message in enumerate(messages):
            final = i == len(messages) - 1
            if final:
                try:
                    full = self.render(messages)
                except TemplateError as exc:
                    raise LmforgeError(f"the chat template refused this conversation: {exc}", where=where) from exc
            else:
                full = self._try_render(messages[: i + 1])
                if full is None:  # e.g. a system turn the template folds into the next user turn
                    continue
            if not full.startswith(prev):
                raise LmforgeError(
                    "the chat template renders a conversation prefix differently from the whole, so turns cannot be masked",
                    where=where, fix="use a template whose rendering only appends per turn (e.g. chat_template: chatml)",
                )
            body_start = len(prev)
            if trained[i]:
                header = ""
                generation = self._try_render(messages[:i], generation_prompt=True)
                if generation is not None and generation.startswith(prev) and full.startswith(generation):
                    header = generation[len(prev):]
                body = full[body_start + len(header):]
                stripped = message["content"].strip()
                if not header and stripped and body.find(stripped) > 0:  # no usable generation prompt
                    header, body = body[: body.find(stripped)], body[body.find(stripped):]
                end = self._split_end(body, message["content"])
                keep_eos = self.train_on_eos in ("turn", "all") or (self.train_on_eos == "last" and i == last_trained)
                if end is None:
                    pieces = [(header, False), (body, True)]
                else:
                    pos, marker = end
                    cut = pos + len(marker) if keep_eos else pos
                    pieces = [(header, False), (body[:cut], True), (body[cut:], False)]
            else:
                body = full[body_start:]
                end = self._split_end(body, message["content"]) if self.train_on_eos == "all" else None
                if end is None:
                    pieces = [(body, False)]
                else:
                    pos, marker = end
                    pieces = [(body[:pos], False), (marker, True), (body[pos + len(marker):], False)]
            out += [Segment(text, train) for text, train in pieces if text]
            prev = full
        return out

    def prompt(self, instruction: str) -> str:
        return self.render([{"role": "user", "content": instruction}], generation_prompt=True)
