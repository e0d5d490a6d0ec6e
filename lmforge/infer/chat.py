"""`lmforge inference CONFIG --chat`: an interactive terminal chat that re-applies the training format each turn.

Commands: ``/retry`` (answer the last message again, sampled: see :data:`RETRY_TEMPERATURE`), ``/undo`` (drop the last exchange),
``/save [FILE]`` (append the conversation to a chat JSONL file, one ``{"messages": [...]}`` line,
which trains as a ``type: chat_template`` dataset), ``/system TEXT``, ``/help`` and ``/exit``.
Ctrl-C while the model answers stops the answer; at the prompt it (or Ctrl-D) leaves.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from lmforge.errors import LmforgeError
from lmforge.infer.generate import Generator, GenerationStream, Sampling

# Greedy decoding (temperature 0, the default) gives the same answer every time, so /retry samples at
# this temperature instead; a session that samples already keeps its own. Each retry also takes the
# next seed, since one seed repeats one answer.
RETRY_TEMPERATURE = 0.7

HELP = (
    "/retry  answer the last message again (sampled: at temperature 0.7 when the chat is greedy)\n"
    "/undo   remove the last exchange\n"
    "/save [FILE]  append this conversation to FILE (chat JSONL, default {save})\n"
    "/system TEXT  set the system message (chat templates only; empty clears it)\n"
    "/image PATH  attach an image to your next message (image-text models)\n"
    "/exit   leave (also Ctrl-D)"
)


class ChatSession:
    """The conversation and the commands; the terminal loop lives in :func:`run_chat`."""

    def __init__(self, generator: Generator, out: TextIO = sys.stdout, save_path: str = "chat.jsonl",
                 system: str | None = None) -> None:
        self.gen = generator
        self.out = out
        self.save_path = save_path
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.current: GenerationStream | None = None
        self.retries = 0
        self.pending_images: list[str] = []  # /image paths, attached to the next user message

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system and self.gen.prompts.multi_turn else []
        return head + self.messages

    def _start(self, sampling: Sampling | None) -> GenerationStream:
        """The answer's stream: through the processor's template when the conversation holds images (each user
        message's images before its text, as the image chats trained), else the training format."""
        if self.pending_images and self.messages and self.messages[-1]["role"] == "user":
            self.messages[-1]["images"] = self.pending_images  # type: ignore[assignment]
            self.pending_images = []
        conversation = self.conversation()
        if not any(m.get("images") for m in conversation):
            return self.gen.stream(self.gen.prompts.conversation(conversation), sampling, where="this message")
        from lmforge.data.images import open_image

        parts, images = [], []
        for m in conversation:
            paths = list(m.get("images") or [])
            images += [open_image(p, where=f"/image {p}") for p in paths]
            parts.append({"role": m["role"], "content": [{"type": "image"} for _ in paths] + [{"type": "text", "text": m["content"]}]})
        return self.gen.stream(self.gen.image_prompt(parts), sampling, where="this message", images=images)

    def answer(self, sampling: Sampling | None = None) -> None:
        """Stream the assistant's answer to the conversation so far and append it."""
        try:
            self.current = self._start(sampling)
        except LmforgeError as exc:
            self.messages.pop()  # the user's message did not fit; leave the conversation as it was
            self.say(f"error: {exc.format()}" + (" (/undo earlier turns to make room)" if self.messages else ""))
            return
        self.out.write("assistant> ")
        self.out.flush()
        stopped = False
        try:
            for piece in self.current:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.current.cancel()
            stopped = True
        text, self.current = self.current.text, None
        if stopped and not text:
            self.messages.pop()  # nothing to keep: an empty answer would train the model to say nothing
            self.say("\n(stopped before any text; your message was dropped)")
            return
        self.say("\n(stopped; /retry answers again)" if stopped else "")
        self.messages.append({"role": "assistant", "content": text})

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.say(HELP.format(save=self.save_path))
        elif name == "/undo":
            if not self.messages:
                self.say("nothing to undo")
            else:
                while self.messages and self.messages[-1]["role"] == "assistant":
                    self.messages.pop()
                if self.messages:
                    self.messages.pop()
                self.say(f"removed the last exchange ({len(self.messages) // 2} left)")
        elif name == "/retry":
            if not self.messages:
                self.say("nothing to retry")
            else:
                if self.messages[-1]["role"] == "assistant":
                    self.messages.pop()
                self.answer(self.retry_sampling())
        elif name == "/image":
            from lmforge.data.images import open_image

            if getattr(self.gen, "processor", None) is None:
                self.say("this model reads text only: /image needs an image-text model (trained with processor_type)")
            elif not arg:
                self.say("usage: /image PATH")
            else:
                try:
                    open_image(arg, where=f"/image {arg}")  # checked now, read again when answered
                except LmforgeError as exc:
                    self.say(f"error: {exc.format()}")
                else:
                    self.pending_images.append(arg)
                    self.say(f"attached {arg} to your next message")
        elif name == "/save":
            self.save(arg or self.save_path)
        elif name == "/system":
            if not self.gen.prompts.multi_turn:
                self.say("this format has no system message (it is not a chat template)")
            else:
                self.system = arg or None
                self.say("system message set" if arg else "system message cleared")
        else:
            self.say(f"unknown command {name} (/help lists them)")
        return True

    def retry_sampling(self) -> Sampling:
        """The settings /retry answers with: sampled (greedy would repeat the answer), on a seed of its own."""
        self.retries += 1
        sampling = self.gen.sampling
        seed = None if sampling.seed is None else sampling.seed + self.retries
        if sampling.temperature > 0:
            return replace(sampling, seed=seed)
        self.say(f"(greedy decoding repeats itself: /retry samples at temperature {RETRY_TEMPERATURE}; "
                 "--temperature sets the chat's own)")
        return replace(sampling, temperature=RETRY_TEMPERATURE, seed=seed)

    def save(self, path: str) -> None:
        if not self.messages:
            self.say("nothing to save yet")
            return
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"messages": self.conversation()}, ensure_ascii=False) + "\n")
        except OSError as exc:
            self.say(f"error: could not write {target}: {exc.strerror}")
            return
        turns = sum(m["role"] == "assistant" for m in self.messages)
        self.say(f"appended this conversation ({turns} exchanges) to {target}; train on it with "
                 f"datasets: [{{path: {target}, type: chat_template}}]")


def run_chat(generator: Generator, save_path: str = "chat.jsonl", system: str | None = None,
             read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> ChatSession:
    """The terminal loop: read a line, run a command or answer it, until /exit or end of input."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    session = ChatSession(generator, out, save_path, system)
    session.say(f"chat with {generator.name}: {generator.prompts.explain()}.")
    if system and not generator.prompts.multi_turn:
        session.say("--system is not used: this format is not a chat template, and has no system message")
    session.say("/help lists the commands, /exit leaves.")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            session.say("")
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not session.command(text):
                break
            continue
        session.messages.append({"role": "user", "content": line.rstrip("\n")})
        session.answer()
    return session
