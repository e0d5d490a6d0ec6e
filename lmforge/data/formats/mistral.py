"""`type: chat_template` with ``tokenizer_use_mistral_common``: conversations encoded straight to ids by mistral-common.

Mistral's own tokenizer library (through transformers' ``MistralCommonBackend``) turns a conversation into token ids
itself: control tokens ([INST], [/INST], [SYSTEM_PROMPT], [THINK], </s>) are ids, never text, so there is no chat
template to render and nothing to find in a string. Rows are read as chat rows are (``field_messages``,
``message_property_mappings``, ``roles``, ``split_thinking``: the reader is :class:`ChatTemplateFormat`'s), and content
parts pass through as mistral-common takes them (``{"type": "thinking", "thinking": ...}`` chunks for reasoning).

Which tokens are trained: mistral-common encodes messages one after another and concatenates them, so the ids of a
conversation's first k turns are a prefix of the whole. Turn k's tokens are then the ids of turns 0..k minus those of
turns 0..k-1: for an assistant turn, its answer and the </s> that ends it. The prefix property is checked for every
row, and a row that breaks it (an old v3 tokenizer moves the system prompt into the last user turn) is refused in one
line rather than masked wrong. This is what axolotl's ``MistralStrategy`` does by tokenizing turn prefixes, and what
mistral-finetune does by encoding message by message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.data.formats.chat import ChatTemplateFormat
from lmforge.errors import LmforgeError

AUDIO_PART_TYPES = ("audio", "input_audio", "audio_url")


@dataclass(frozen=True)
class TokenSegment:
    """A run of one example's token ids, all trained or all not (what a format that encodes ids itself returns)."""

    ids: tuple[int, ...]
    train: bool
    text: str = ""  # the ids decoded with their control tokens, for reading (held-out prompts, reports)
    images: dict[str, Any] | None = None  # the row's pixel tensors (on its first run), as Example.images holds them


@dataclass(frozen=True)
class ImageRows:
    """How an image-text run (processor_type) reads a dataset entry's images, as lmforge.data.images does for others."""

    base_dir: Any  # the dataset file's folder: relative image paths start there
    size: Any = None  # image_size
    resample: str | None = None  # image_resize_algorithm
    sequence_len: int | None = None  # a row whose image tokens do not fit is refused: cutting them breaks the image


def is_mistral_common(tokenizer: Any) -> bool:
    """Whether `tokenizer` is transformers' wrapper for mistral-common (tokenizer_use_mistral_common)."""
    return type(tokenizer).__name__ == "MistralCommonBackend"


class EncodedPrompt(str):
    """A prompt mistral-common encoded: its text (control tokens written out, for display) and the exact ids.

    Generation reads ``ids``: Mistral's control tokens are never parsed from text, so the text alone would not
    give them back."""

    ids: list[int]

    def __new__(cls, text: str, ids: list[int]) -> "EncodedPrompt":
        prompt = super().__new__(cls, text)
        prompt.ids = list(ids)
        return prompt


class ImageConversation(str):
    """An image chat to encode with mistral-common at inference: its messages (``{"type": "image"}`` where each image
    goes); the text is the conversation as mistral-common writes it, for display. The images come with it to
    :func:`encode_image_conversation`."""

    messages: list[dict[str, Any]]

    def __new__(cls, text: str, messages: list[dict[str, Any]]) -> "ImageConversation":
        prompt = super().__new__(cls, text)
        prompt.messages = messages
        return prompt

    @classmethod
    def of(cls, messages: list[dict[str, Any]]) -> "ImageConversation":
        def text(part: dict[str, Any]) -> str:
            return "[IMG]" if part.get("type") == "image" else str(part.get("text", ""))

        turns = [m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}] for m in messages]
        return cls("\n".join(f"{m['role']}: " + "".join(text(p) for p in parts) for m, parts in zip(messages, turns)), messages)


def with_images(messages: list[dict[str, Any]], images: list[Any], where: str) -> list[dict[str, Any]]:
    """`messages` with each ``{"type": "image"}`` part given its Pillow image, in order, as the PNG mistral-common's
    image encoder reads (the wrapper takes an image as a path, a URL or base64)."""
    import base64
    import io

    remaining = iter(images)
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    image = next(remaining, None)
                    if image is None:
                        raise LmforgeError("more image placeholders than images", where=where, fix="give each image part its image")
                    buffer = io.BytesIO()
                    image.convert("RGB").save(buffer, format="PNG")
                    part = {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode()}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    if next(remaining, None) is not None:
        raise LmforgeError("more images than image placeholders", where=where, fix="add one image part per image")
    return out


def encode_image_conversation(tokenizer: Any, prompt: ImageConversation, images: list[Any], where: str) -> tuple[list[int], dict[str, Any]]:
    """The ids and pixel tensors (pixel_values, image_sizes) of an image chat, as training encoded its image rows."""
    fmt = MistralChatFormat(tokenizer=tokenizer, reader=ChatTemplateFormat(template="", end_of_turn=(), keep_parts=True))
    ids, pixels = fmt.encode_with_images(with_images(prompt.messages, images, where), where)
    return ids, pixels or {}


@dataclass(frozen=True)
class MistralChatFormat:
    """A chat dataset encoded by mistral-common; the loss on ``roles_to_train`` turns (assistant by default)."""

    tokenizer: Any  # transformers' MistralCommonBackend, in mistral-common's agnostic validation mode
    reader: ChatTemplateFormat  # reads a row's turns (field_messages, role and content keys, roles); renders nothing
    images: ImageRows | None = None  # an image-text model's rows: images encoded by mistral-common's image encoder
    renders_special_tokens: bool = True  # the ids carry BOS and every control token: nothing is added
    encodes_ids: bool = True  # segments() returns TokenSegments (ids), not text
    end_of_turn: tuple[str, ...] = ()  # an answer ends with EOS, the one stop token

    # -- encoding (mistral-common's own path) ---------------------------------------------------------

    def encode(self, messages: list[dict[str, Any]], where: str) -> list[int]:
        """The ids mistral-common gives `messages` (a conversation that ends on any turn)."""
        return self.encode_with_images(messages, where)[0]

    def encode_with_images(self, messages: list[dict[str, Any]], where: str) -> tuple[list[int], dict[str, Any] | None]:
        """The ids and, for image parts, the pixel tensors (pixel_values, image_sizes) mistral-common makes."""
        from mistral_common.exceptions import MistralCommonException

        try:
            if not any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
                       for m in messages):
                return list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)), None
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
            return out["input_ids"][0].tolist(), {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
        except (MistralCommonException, ValueError, TypeError, KeyError, AssertionError, ImportError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LmforgeError(f"mistral-common refused this conversation: {first}", where=where,
                               fix="fix the row (turns alternate user/assistant after an optional system turn)") from exc

    def decode(self, ids: list[int]) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self.tokenizer.tokenizer.decode(list(ids), special_token_policy=SpecialTokenPolicy.KEEP)

    def _mistral_message(self, message: dict[str, Any], where: str) -> dict[str, Any]:
        """A read message as mistral-common takes it: reasoning (``reasoning_content``) becomes a thinking chunk."""
        content = message["content"]
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in AUDIO_PART_TYPES for p in content):
            raise LmforgeError("this row has audio, and lmforge trains text and image-text models", where=where,
                               fix="remove the audio rows (skip_bad_rows: true skips and counts them)")
        out = {k: v for k, v in message.items() if k != self.reader.thinking_key}
        thinking = message.get(self.reader.thinking_key)
        if message["role"] == "assistant" and isinstance(thinking, str) and thinking.strip():
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            out["content"] = [{"type": "thinking", "thinking": thinking}, *parts]
        return out

    def messages(self, row: dict[str, Any], where: str) -> list[dict[str, Any]]:
        from lmforge.data.images import has_images

        if has_images(row):
            if self.images is None:  # mistral-common would encode the image tokens and the text model would train blind
                raise LmforgeError("this row has images, and the model is trained as a text-only model", where=where,
                                   fix="set processor_type: AutoProcessor with an image-text base_model, or remove the "
                                   "image rows (skip_bad_rows: true skips and counts them)")
            return self._image_messages(row, where)
        return [self._mistral_message(m, where) for m in self.reader.messages(row, where)]

    def _image_messages(self, row: dict[str, Any], where: str) -> list[dict[str, Any]]:
        """An image row read and its images opened and checked as every image chat is (lmforge.data.images), each
        image handed to mistral-common where its part stands, as the PNG its image encoder reads."""
        from lmforge.data.images import image_chat

        settings = self.images
        assert settings is not None
        chat = image_chat(row, where, base_dir=settings.base_dir, size=settings.size, resample=settings.resample,
                          field_messages=self.reader.field_messages, roles=self.reader.roles)
        return [self._mistral_message(m, where) for m in with_images(chat.messages, chat.images, where)]

    # -- training rows ----------------------------------------------------------------------------------

    def segments(self, row: dict[str, Any], where: str) -> list[TokenSegment]:
        return self.conversation_segments(self.messages(row, where), where)

    def conversation_segments(self, messages: list[dict[str, Any]], where: str) -> list[TokenSegment]:
        """The conversation's ids in runs, trained where a turn of ``roles_to_train`` is (its answer and its </s>)."""
        full, pixels = self.encode_with_images(messages, where)
        limit = self.images.sequence_len if self.images is not None else None
        if pixels is not None and limit is not None and len(full) > limit:
            raise LmforgeError(f"the row is {len(full)} tokens with its image tokens, over sequence_len {limit} (cutting "
                               "image tokens would leave the model's image features without their places)", where=where,
                               fix=f"raise sequence_len above {len(full)}, or use smaller images (image_size)")
        trained = [False] * len(full)
        flags = [m["role"] in self.reader.roles_to_train for m in messages]
        last = max((i for i, f in enumerate(flags) if f), default=-1)
        eos = self.tokenizer.eos_token_id
        setting = self.reader.train_on_eot or self.reader.train_on_eos
        prefixes: dict[int, list[int]] = {len(messages): full}

        def prefix(count: int) -> list[int]:
            if count not in prefixes:
                # the start of a conversation (BOS) is what precedes its first turn
                prefixes[count] = self.encode(messages[:count], where) if count else full[:1] if full[:1] == [self.tokenizer.bos_token_id] else []
                if full[:len(prefixes[count])] != prefixes[count]:
                    raise LmforgeError(
                        f"mistral-common encodes the first {count} turns of this conversation differently from the whole, "
                        "so its turns cannot be masked (older tokenizers move the system prompt into the last user turn)",
                        where=where, fix="drop the system turn (drop_system_message: true), or train on every token "
                        "(train_on_inputs: true)")
            return prefixes[count]

        for i, flag in enumerate(flags):
            if not flag:
                continue
            start, end = len(prefix(i)), len(prefix(i + 1))
            trained[start:end] = [True] * (end - start)
            if end > start and full[end - 1] == eos and (setting == "none" or (setting == "last" and i != last)):
                trained[end - 1] = False  # train_on_eos / train_on_eot: the </s> that ends this turn stays untrained
        runs = self._runs(full, trained)
        if pixels is not None:  # the pixels ride on the first run; image tokens are in user turns, never trained
            runs[0] = TokenSegment(runs[0].ids, runs[0].train, runs[0].text, pixels)
        return runs

    def _runs(self, ids: list[int], trained: list[bool]) -> list[TokenSegment]:
        runs: list[TokenSegment] = []
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or trained[i] != trained[start]:
                piece = ids[start:i]
                runs.append(TokenSegment(tuple(piece), trained[start], self.decode(piece)))
                start = i
        return runs

    # -- inference (the same encoder) -------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        """The conversation's ids written out with their control tokens (for display; generation uses the ids)."""
        return self.decode(self.encode(messages, "this conversation"))

    def conversation_prompt(self, messages: list[dict[str, Any]]) -> EncodedPrompt:
        """A conversation so far, encoded to end where the model answers ([/INST]), as training encoded it."""
        turns = [self._mistral_message(dict(m), "this conversation") for m in messages]
        ids = self.encode(turns, "this conversation")
        return EncodedPrompt(self.decode(ids), ids)

    def prompt(self, instruction: str) -> EncodedPrompt:
        return self.conversation_prompt([{"role": "user", "content": instruction}])
