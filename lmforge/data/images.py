"""Image chats (`type: chat_template` rows with image parts, for a config with ``processor_type``): images read
and checked, the conversation rendered by the processor's chat template, tokens, pixels and labels.

Row layouts read (axolotl's, TRL's, OpenAI's and llava-instruct-mix's):
- an image content part carrying its image: ``{"type": "image", "path" | "url" | "base64" | "image": ...}``, or
  OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``;
- an image content part without one (``{"type": "image"}``), filled in order from the row's ``images`` column
  (or ``image``): paths, base64 or ``data:`` URLs, ``{"bytes": ..., "path": ...}`` as Hugging Face datasets stores them.
A relative path is read from the dataset file's folder. An http(s) URL is refused offline in one line (lmforge
reads local data; download the image and give its path).

Images open with Pillow, whose decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) refuses huge images before
they are decoded; a truncated file fails as it is read. Then ``image_size`` / ``image_resize_algorithm`` resize it.

Labels: the template's ``{% generation %}`` blocks mark the trained characters when it has them (transformers'
own ``return_assistant_tokens_mask`` rule); otherwise each trained turn is the text its rendering adds after the
conversation before it with the generation prompt (as axolotl and TRL find it). The text is tokenized on its own
to find the trained tokens (by their character offsets), then with the images by the processor, which expands each
image placeholder into the model's image tokens; the two id sequences are aligned, so the labels follow the text
and every image token stays untrained.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.examples import IGNORE_INDEX, Example, PrepareStats, read_good_rows, trained_token_mask
from lmforge.data.formats.chat import DEFAULT_ROLES, template_errors
from lmforge.errors import LmforgeError

IMAGE_PART_TYPES = ("image", "image_url", "input_image")
IMAGE_COLUMNS = ("images", "image")
BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def has_images(row: dict[str, Any]) -> bool:
    """Whether a chat row carries images (an image content part, or an images column): what a text-only model refuses."""
    if any(row.get(column) not in (None, [], "") for column in IMAGE_COLUMNS):
        return True
    for name in ("messages", "conversations"):
        turns = row.get(name)
        if isinstance(turns, list):
            for turn in turns:
                content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
                if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in content):
                    return True
    return False


def _decode_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise LmforgeError(f"image is not valid base64 ({exc})", where=where, fix="encode the image file's bytes as base64") from exc


def _source_bytes(source: Any, base_dir: Path | None, where: str) -> tuple[bytes, str]:
    """The image file's bytes and a name for messages, from any of the forms a row may hold."""
    if isinstance(source, dict):
        if source.get("bytes"):
            return bytes(source["bytes"]), "image bytes"
        source = source.get("path") or source.get("url") or source.get("base64") or source.get("image")
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), "image bytes"
    if not isinstance(source, str) or not source:
        raise LmforgeError(f"image has no data (got {type(source).__name__})", where=where,
                           fix="give the image as a path, a base64 string or a data: URL")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise LmforgeError("a data: URL image must be base64-encoded", where=where, fix="use data:image/png;base64,...")
        return _decode_base64(payload, where), "data: URL"
    if source.startswith(("http://", "https://")):
        raise LmforgeError(f"image URL {source[:80]} is not fetched: lmforge reads images from local files", where=where,
                           fix="download the image and give its path (or base64) in the row")
    # base64: long, of its 65 characters only (no dot, so no file extension); anything else is a path
    if len(source) >= 64 and BASE64.fullmatch(source):
        return _decode_base64(source, where), "base64 image"
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise LmforgeError(f"image file {path} does not exist", where=where, fix="fix the path (relative paths start at the dataset file's folder)")
    return path.read_bytes(), str(path)


def open_image(source: Any, where: str, base_dir: Path | None = None, size: Any = None, resample: str | None = None) -> Any:
    """A checked RGB Pillow image from a row's image value; one LmforgeError naming `where` for any bad image."""
    from PIL import Image

    if isinstance(source, Image.Image):
        image, name = source, "image"
    else:
        data, name = _source_bytes(source, base_dir, where)
        try:
            with warnings.catch_warnings():
                # Pillow warns between MAX_IMAGE_PIXELS and twice it, and raises beyond: both refused here
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise LmforgeError(f"{name} is too large to decode ({str(exc).split('.')[0]})", where=where,
                               fix="shrink the image (Pillow's decompression-bomb limit is Image.MAX_IMAGE_PIXELS pixels)") from exc
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow: UnidentifiedImageError (an OSError), truncated files
            raise LmforgeError(f"{name} does not open as an image ({exc})", where=where,
                               fix="replace the file, or set skip_bad_rows: true to skip and count such rows") from exc
    image = image.convert("RGB")
    if size is not None:
        image = resize(image, size, resample)
    return image


def resize(image: Any, size: Any, resample: str | None = None) -> Any:
    """axolotl's image_size: N pads to a square (black) then resizes to N×N; [W, H] resizes to W×H."""
    from PIL import Image

    method = Image.Resampling[(resample or "bilinear").upper()]
    if isinstance(size, int):
        side = max(image.size)
        if image.size != (side, side):
            square = Image.new("RGB", (side, side))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        return image.resize((size, size), method)
    return image.resize((int(size[0]), int(size[1])), method)


@dataclass
class ImageChat:
    """A row as the processor's template reads it: messages with content parts, and its images in order."""

    messages: list[dict[str, Any]]
    images: list[Any]


def image_chat(row: dict[str, Any], where: str, *, base_dir: Path | None = None, size: Any = None, resample: str | None = None,
               field_messages: str | None = None, roles: dict[str, str] | None = None, load: bool = True) -> ImageChat:
    """A row's messages (every content a list of parts; image parts reduced to ``{"type": "image"}``, which is all a
    template reads) and its images, opened and checked (``load``); raises one LmforgeError for a bad row."""
    roles = roles or DEFAULT_ROLES
    name = field_messages or next((k for k in ("messages", "conversations") if k in row), "messages")
    turns = row.get(name)
    if not isinstance(turns, list) or not turns:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise LmforgeError(f"field '{name}' is missing or holds no turns (columns present: {present})", where=where,
                           fix="set field_messages to the column holding the turns")
    column = next((row[c] for c in IMAGE_COLUMNS if row.get(c) not in (None, "")), [])
    column = column if isinstance(column, list) else [column]
    sources: list[Any] = []
    spare = iter(column)
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise LmforgeError(f"turn {number} is not an object", where=where)
        speaker = str(turn.get("role", turn.get("from", "")))
        role = roles.get(speaker, speaker if speaker in roles.values() else None)
        if role is None:
            raise LmforgeError(f"turn {number} has unknown role '{speaker}'", where=where, fix="map it under roles:")
        content = turn.get("content", turn.get("value"))
        parts: list[dict[str, Any]] = []
        for part in content if isinstance(content, list) else [{"type": "text", "text": "" if content is None else str(content)}]:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in IMAGE_PART_TYPES:
                inline = part.get("path") or part.get("url") or part.get("base64") or part.get("image")
                if kind == "image_url":
                    inline = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
                if inline is None:
                    inline = next(spare, None)
                    if inline is None:
                        raise LmforgeError(f"turn {number} has more image placeholders than the row has images "
                                           f"({len(column)} in its images column)", where=where,
                                           fix="give each image part its image (path, base64) or one images entry per part")
                sources.append(inline)
                parts.append({"type": "image"})
            elif isinstance(part, dict):
                text = part.get("text", part.get("content"))
                parts.append({"type": "text", "text": "" if text is None else str(text)})
            else:
                parts.append({"type": "text", "text": str(part)})
        messages.append({"role": role, "content": parts})
    left = sum(1 for _ in spare)
    if left:
        raise LmforgeError(f"the row has {len(column)} images but {len(column) - left} image placeholders in its turns",
                           where=where, fix="add one {\"type\": \"image\"} part per image, where each image belongs")
    images = [open_image(s, f"{where}: image {i}", base_dir, size, resample) for i, s in enumerate(sources)] if load else sources
    return ImageChat(messages, images)


def _render(template: str, messages: list[dict[str, Any]], variables: dict[str, Any], generation_prompt: bool = False,
            track: bool = False) -> tuple[str, list[tuple[int, int]]]:
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, spans = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=generation_prompt,
                                         return_assistant_tokens_mask=track, **variables)
    return texts[0], [tuple(span) for span in spans[0]] if track else []


def trained_spans(template: str, messages: list[dict[str, Any]], variables: dict[str, Any], where: str,
                  roles_to_train: tuple[str, ...] = ("assistant",)) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans its loss falls on (see the module docstring)."""
    from lmforge.data.formats.templates import has_generation_blocks

    try:
        if has_generation_blocks(template) and roles_to_train == ("assistant",):
            return _render(template, messages, variables, track=True)
        full = _render(template, messages, variables)[0]
        spans = []
        for i, message in enumerate(messages):
            if message["role"] not in roles_to_train:
                continue
            before = _render(template, messages[:i], variables, generation_prompt=True)[0] if i else ""
            through = _render(template, messages[: i + 1], variables)[0]
            if not (through.startswith(before) and full.startswith(through)):
                raise LmforgeError("the chat template renders a turn differently once later turns follow, so its trained "
                                   "text cannot be found", where=where, fix="use a template with {% generation %} blocks")
            spans.append((len(before), len(through)))
        return full, spans
    except template_errors() as exc:
        raise LmforgeError(f"the chat template refused this conversation: {exc}", where=where) from exc


def processor_inputs(processor: Any, text: str, images: list[Any]) -> dict[str, Any]:
    """What the processor makes of one rendered conversation and its images (batch of one, torch tensors)."""
    return dict(processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt"))


def image_token_ids(processor: Any) -> set[int]:
    """Ids the processor puts in place of an image (its image token and, Idefics3-style, the tokens around it)."""
    tokenizer = processor.tokenizer
    ids = set()
    for name in ("image_token", "boi_token", "eoi_token", "fake_image_token", "global_image_token", "image_start_token",
                 "image_end_token", "vision_start_token", "vision_end_token"):
        token = getattr(processor, name, None) or getattr(tokenizer, name, None)
        if isinstance(token, str):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    if getattr(processor, "image_token_id", None) is not None:
        ids.add(int(processor.image_token_id))
    return ids


def align_labels(plain_ids: list[int], plain_labels: list[int], ids: list[int], never: set[int]) -> list[int]:
    """Labels for `ids` (the processor's, image placeholders expanded) from labels of `plain_ids` (the text alone):
    tokens the two share keep their label, tokens the processor added (image tokens) get none."""
    labels = [IGNORE_INDEX] * len(ids)
    matcher = difflib.SequenceMatcher(None, plain_ids, ids, autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            labels[b0:b1] = plain_labels[a0:a1]
    return [IGNORE_INDEX if token in never else label for token, label in zip(ids, labels)]


# Processor outputs that are the text's own (lmforge builds them per batch); everything else is the images'.
TOKEN_TYPE_FIELDS = ("token_type_ids", "mm_token_type_ids")
TEXT_FIELDS = ("input_ids", "attention_mask", *TOKEN_TYPE_FIELDS, "offset_mapping")


def image_example(processor: Any, template: str, chat: ImageChat, where: str, sequence_len: int, train_on_inputs: bool,
                  stats: PrepareStats, variables: dict[str, Any] | None = None,
                  roles_to_train: tuple[str, ...] = ("assistant",)) -> Example | None:
    """One row's tokens, labels and pixel tensors; None (counted in `stats`) when it cannot train."""

    tokenizer = processor.tokenizer
    variables = {**tokenizer.special_tokens_map, **(variables or {})}
    full, spans = trained_spans(template, chat.messages, variables, where, roles_to_train)
    placeholders = full.count(processor.image_token) if getattr(processor, "image_token", None) else None
    if placeholders is not None and placeholders != len(chat.images):
        raise LmforgeError(f"the rendered conversation has {placeholders} image placeholders for {len(chat.images)} images",
                           where=where, fix="put one image part in the turns per image")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    plain = list(encoded["input_ids"])
    mask = trained_token_mask(encoded["offset_mapping"], sorted(spans))
    plain_labels = plain if train_on_inputs else np.where(mask, np.asarray(plain, dtype=np.int64), IGNORE_INDEX).tolist()
    try:
        inputs = processor_inputs(processor, full, chat.images)
    except (ValueError, TypeError, OSError) as exc:
        raise LmforgeError(f"the processor refused this row: {str(exc).splitlines()[0]}", where=where) from exc
    ids = inputs["input_ids"][0].tolist()
    never = image_token_ids(processor)
    labels = align_labels(plain, plain_labels, ids, never)
    if len(ids) > sequence_len:
        if any(token in never for token in ids[sequence_len:]):
            raise LmforgeError(f"the row's {len(ids)} tokens (with its image tokens) do not fit in sequence_len {sequence_len}, "
                               "and an image cannot be cut", where=where, fix=f"raise sequence_len to {len(ids)} or more, or use smaller images")
        stats.truncated += 1
        ids, labels = ids[:sequence_len], labels[:sequence_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        stats.no_trainable_tokens += 1
        return None
    stats.tokens += len(ids)
    stats.label_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
    pixels = {k: v for k, v in inputs.items() if k not in TEXT_FIELDS and hasattr(v, "shape")}
    token_types = {k: inputs[k][:, :len(ids)] for k in TOKEN_TYPE_FIELDS if hasattr(inputs.get(k), "shape")}
    return Example(ids, labels, pixels or None, token_types or None)


def dataset_folder(path: str) -> Path | None:
    """Where a dataset entry's relative image paths start: its file's folder (or the folder itself)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    return local.parent if local.exists() or local.parent.is_dir() else None


def chat_template_for_images(processor: Any, data: Any) -> str:
    """The template image chats render with: chat_template_jinja when given, else the processor's own (a VLM's template
    places its image tokens; a text template names such as axolotl's `llava` stand for exactly that one)."""
    if getattr(data, "chat_template_jinja", None):
        from lmforge.data.formats.templates import resolve_template

        return resolve_template("jinja", processor.tokenizer, jinja=data.chat_template_jinja)[0]
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise LmforgeError("the processor has no chat template to render image chats with", where="chat_template",
                           fix="set chat_template_jinja to the model's image chat template")
    return template


def image_examples(spec: Any, where: str, rows: list[tuple[dict[str, Any] | None, str, str | None]], data: Any, processor: Any,
                   stats: PrepareStats) -> list[Example]:
    """Examples of one dataset entry's image-chat rows; a bad row raises naming its file:line, or with skip_bad_rows
    is skipped and counted (a missing or broken image, too many images, a row too long for its images)."""

    if spec.type not in ("chat_template", "sharegpt"):
        raise LmforgeError(f"processor_type trains on image chats; type '{spec.type}' is not one", where=f"{where}.type",
                           fix="use type: chat_template (messages with image content parts)")
    template = chat_template_for_images(processor, data)
    base_dir = dataset_folder(spec.path)
    roles = dict(DEFAULT_ROLES)
    for role, names in (getattr(spec, "roles", None) or {}).items():
        for name in [names] if isinstance(names, str) else names:
            roles[name] = role
    roles_to_train = tuple(roles.get(r, r) for r in (getattr(spec, "roles_to_train", None) or ("assistant",)))
    variables = dict(getattr(data, "chat_template_kwargs", None) or {})
    examples = []
    def read(values: dict[str, Any], row_where: str) -> Example | None:
        chat = image_chat(values, row_where, base_dir=base_dir, size=data.image_size, resample=data.image_resize_algorithm,
                          field_messages=getattr(spec, "field_messages", None), roles=roles)
        return image_example(processor, template, chat, row_where, data.sequence_len, data.train_on_inputs, stats,
                             variables, roles_to_train)

    for _, example in read_good_rows(rows, read, data.skip_bad_rows, stats):
        if example is not None:
            examples.append(example)
    return examples
