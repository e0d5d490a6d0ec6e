"""What the model sees at inference: the training format re-applied to a prompt or a conversation.

The first dataset's ``type:`` decides, through the same :func:`lmforge.data.formats.get_format`
training uses, so a prompt is wrapped exactly as training rows were:

- a chat format (``chat_template`` / ``sharegpt``, or a hook that returns messages) renders the
  whole conversation with its template and the generation prompt, so every turn sees the earlier
  ones, as in training;
- an instruction format (alpaca, a user-defined mapping) was trained on single exchanges, so each
  message is wrapped on its own: the model answers the latest message without the earlier turns
  (:attr:`PromptBuilder.multi_turn` is False, and the chat says so);
- ``completion`` text (and a pretraining config) is continued as written.

It also lists every token that ends an answer: EOS, the model's own generation EOS ids, and the
end-of-turn markers the format writes (``<|im_end|>``, ``<|eot_id|>``, ...), so a model whose
end-of-turn token differs from EOS still stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmforge.data.formats import ChatTemplateFormat, EncodedPrompt, HookFormat, MistralChatFormat, get_format, is_mistral_common
from lmforge.data.formats.templates import KNOWN_END_OF_TURN
from lmforge.data.prepare import adds_bos

def _rl_chat_template(cfg: Any, kind: str, tokenizer: Any) -> str | None:
    """The chat template a preference or GRPO run rendered its prompts with, or None where they were raw text:
    chat_template.default uses the config's template; axolotl's fixed chatml.* / llama3.* wrappers are those
    named templates; GRPO's message prompts use the tokenizer's own; user_defined pairs (prompt_format) are raw."""
    family = kind.split(".")[0]
    if family == "chat_template":
        return cfg.data.chat_template or "tokenizer_default"
    if family in ("chatml", "llama3"):
        return family
    if cfg.rl.rl == "grpo" and getattr(tokenizer, "chat_template", None):
        return "tokenizer_default"
    return None

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclass
class PromptBuilder:
    """Turns user text or OpenAI-style messages into the prompt string training would have produced."""

    tokenizer: Any
    fmt: Any = None  # a PromptFormat, or None for raw text (pretraining configs)
    describe: str = "raw text"
    stop_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any, model: Any = None) -> "PromptBuilder":
        fmt, describe = None, "raw text (no datasets in the config)"
        datasets = cfg.data.datasets or []
        if datasets:
            spec = datasets[0]
            kind = spec.type if isinstance(spec.type, str) else "user-defined format"
            describe = f"datasets[0].type ({kind})"
            rl = getattr(cfg, "rl", None)
            if rl is not None and (rl.preference or rl.rl == "grpo"):
                # Pairs and GRPO prompts are not SFT formats: chats render as their prompts were rendered in training.
                template = _rl_chat_template(cfg, kind, tokenizer)
                if template is not None:
                    data = cfg.data.model_copy(update={"chat_template": template})
                    fmt = get_format("chat_template", "datasets[0].type", spec=spec, tokenizer=tokenizer, data=data)
                    describe = f"{describe}, rendered with chat_template {template}"
                else:
                    describe = f"{describe}: raw text"
            else:
                # `data` carries chat_template, chat_template_jinja, chat_template_kwargs and eot_tokens, as in training.
                fmt = get_format(spec.type, "datasets[0].type", spec=spec, tokenizer=tokenizer, data=cfg.data)
        builder = cls(tokenizer=tokenizer, fmt=fmt, describe=describe)
        builder.stop_token_ids = builder._stop_ids(model)
        return builder

    # -- what kind of format ------------------------------------------------------------------------

    @property
    def chat(self) -> ChatTemplateFormat | MistralChatFormat | None:
        """The chat template that renders conversations, when the training format is a chat format (or mistral-common,
        which encodes them to ids: its prompts carry those ids, see EncodedPrompt)."""
        if isinstance(self.fmt, (ChatTemplateFormat, MistralChatFormat)):
            return self.fmt
        if isinstance(self.fmt, HookFormat) and self.fmt.chat is not None:
            return self.fmt.chat
        return None

    @property
    def multi_turn(self) -> bool:
        return self.chat is not None

    def explain(self) -> str:
        """One line for the chat's banner: how each turn is formatted."""
        if isinstance(self.fmt, MistralChatFormat):
            return f"each turn encodes the whole conversation with mistral-common, as in training ({self.describe})"
        if self.multi_turn:
            return f"each turn renders the whole conversation with the chat template, as in training ({self.describe})"
        return (
            f"{self.describe} trains single exchanges, so each message is wrapped in that format on its own and "
            "answered without the earlier turns (train with type: chat_template for multi-turn chat)"
        )

    # -- prompts ------------------------------------------------------------------------------------

    def _with_bos(self, prompt: str) -> str:
        # Training prepends BOS to formats that do not render special tokens themselves; so must we.
        renders = getattr(self.fmt, "renders_special_tokens", False) if self.fmt is not None else False
        bos = self.tokenizer.bos_token
        if not renders and bos and adds_bos(self.tokenizer) and not prompt.startswith(bos):
            if is_mistral_common(self.tokenizer):  # mistral-common never reads a control token from text: BOS as an id
                return EncodedPrompt(bos + prompt, [self.tokenizer.bos_token_id, *self.tokenizer.encode(prompt, add_special_tokens=False)])
            return bos + prompt
        return prompt

    def single(self, text: str) -> str:
        """The prompt for one user message, exactly as training wrapped its rows."""
        if self.fmt is None:
            return self._with_bos(text)
        return self._with_bos(self.fmt.prompt(text))

    def wrap(self, prompt: str) -> str:
        """A prompt already rendered in the training format (a held-out row's prompt segments), with BOS where
        training adds it: what :meth:`single` returns for a user's text."""
        return self._with_bos(prompt)

    @property
    def end_markers(self) -> list[str]:
        """Texts that end an answer in this format (a chat template's end-of-turn, else the known markers)."""
        return list(self.chat.end_of_turn) if self.chat is not None else list(KNOWN_END_OF_TURN)

    def conversation(self, messages: list[dict[str, str]]) -> str:
        """The prompt that asks for the next assistant turn of ``messages`` (OpenAI roles)."""
        chat = self.chat
        if chat is not None:
            return chat.conversation_prompt([{"role": m["role"], "content": m["content"]} for m in messages])
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        if last is None:
            raise ValueError("the conversation has no user message")
        return self.single(last)

    # -- when to stop -------------------------------------------------------------------------------

    def _stop_ids(self, model: Any) -> list[int]:
        tok = self.tokenizer
        ids: list[int] = []

        def add(value: Any) -> None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and v >= 0 and v not in ids:
                    ids.append(v)

        add(tok.eos_token_id)
        config = getattr(model, "generation_config", None)
        if config is not None:
            add(getattr(config, "eos_token_id", None))
        # End-of-turn markers the format writes around an answer (a chat template's, or a format string's).
        if self.chat is not None:
            try:
                sample = self.chat.render(_PROBE)
            except Exception:  # a template that refuses the probe: fall back to its declared markers
                sample = "".join(self.chat.end_of_turn)
            markers = [m for m in self.chat.end_of_turn if m and m in sample]
        elif self.fmt is not None:
            sample = self.fmt.prompt("Hi")
            markers = [m for m in KNOWN_END_OF_TURN if m in sample]
        else:
            markers = []
        for marker in markers:
            marker_ids = tok(marker, add_special_tokens=False).input_ids
            if len(marker_ids) == 1 and marker_ids[0] != tok.unk_token_id:
                add(marker_ids[0])
        return ids
