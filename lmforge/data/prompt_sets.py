"""Prompt datasets for GRPO: each row becomes a prompt to complete, plus the columns its reward functions read.

As in axolotl, a dataset's ``type:`` names a transform factory (``file.py:function`` or ``module.function``,
checked by lmforge.config.hooks like any dataset hook). It is called once, ``factory(cfg, dataset_idx=i)``, and
returns the row transform, or ``(transform, {"remove_columns": [...]})``. The transform maps a row to a dict
(``transform(row)``, or ``transform(row, tokenizer=...)`` when it takes a tokenizer) that holds ``prompt``:
a list of chat messages (rendered with the tokenizer's chat template and its generation prompt) or plain text
(used as written). The row's other columns, minus ``remove_columns``, plus what the transform returned, are
passed to every reward function by name (``answer`` for GSM8K), as TRL does.

``sequence_len`` bounds a prompt; a longer one keeps its last tokens (where the question ends and the answer
starts) and is counted. A transform that returns None skips the row (counted); a transform that raises, or
returns no prompt, stops with the dataset's file:line.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmforge.data.formats.hook import load_hook
from lmforge.data.sources import no_rows, read_rows
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids, the prompt as the reward functions see it, and the row's other columns."""

    ids: tuple[int, ...]
    value: Any  # messages (list of dicts) or text: what reward functions get as `prompts`
    columns: Mapping[str, Any]


@dataclass
class PromptSet:
    train: list[Prompt]
    eval: list[Prompt]
    rows: int = 0
    skipped: int = 0  # rows the transform returned None for
    truncated: int = 0  # prompts longer than sequence_len, cut to their last tokens
    columns: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        text = f"{self.rows} rows → {len(self.train)} train / {len(self.eval)} eval prompts"
        if self.skipped:
            text += f"; {self.skipped} skipped by the transform"
        if self.truncated:
            text += f"; {self.truncated} cut to their last tokens (sequence_len)"
        return text + (f"; reward columns: {', '.join(self.columns)}" if self.columns else "")


class ConfigView(dict):
    """The config as axolotl's transforms read it: ``cfg.key`` or ``cfg["key"]``, None for a key not set."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)


def row_transform(kind: str, where: str, cfg: Mapping[str, Any], index: int) -> tuple[Callable[..., Any], list[str]]:
    """The row transform a dataset's `type:` factory returns, and the columns it asks to remove."""
    factory = load_hook(kind, where)
    try:
        made = factory(ConfigView(cfg), dataset_idx=index)
    except TypeError:  # a factory that takes the config only
        made = factory(ConfigView(cfg))
    except Exception as exc:
        raise LmforgeError(f"{kind} raised {type(exc).__name__}: {exc}", where=where,
                           fix="fix the transform factory (it is called once with the config)") from exc
    options: Mapping[str, Any] = {}
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], Mapping):
        made, options = made
    if not callable(made):
        raise LmforgeError(f"{kind} returned {type(made).__name__}, not a row transform", where=where,
                           fix="return the function that maps a row to {'prompt': ...} (optionally with {'remove_columns': [...]})")
    remove = options.get("remove_columns") or []
    return made, [remove] if isinstance(remove, str) else list(remove)


def render_prompt(value: Any, tokenizer: Any, template_kwargs: Mapping[str, Any] | None, where: str) -> list[int]:
    """Token ids of a prompt: messages through the chat template (with the generation prompt), text as written."""
    if isinstance(value, str):
        return tokenizer(value, add_special_tokens=False).input_ids
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
        if not getattr(tokenizer, "chat_template", None):
            raise LmforgeError("the prompt is a list of messages and the tokenizer has no chat template", where=where,
                               fix="set chat_template:, or return the prompt as text")
        text = tokenizer.apply_chat_template([dict(m) for m in value], tokenize=False, add_generation_prompt=True,
                                             **dict(template_kwargs or {}))
        return tokenizer(text, add_special_tokens=False).input_ids
    raise LmforgeError(f"prompt must be text or a list of {{role, content}} messages, got {str(value)[:60]!r}", where=where,
                       fix="return {'prompt': [{'role': 'user', 'content': ...}], ...} from the transform")


def prompts_of(spec: Any, index: int, key: str, tokenizer: Any, cfg: Mapping[str, Any], max_tokens: int,
               template_kwargs: Mapping[str, Any] | None, counts: PromptSet) -> list[Prompt]:
    """One dataset entry's prompts."""
    where = f"{key}[{index}].type"
    transform, remove = row_transform(spec.type, where, cfg, index)
    if "tokenizer" in inspect.signature(transform).parameters:
        plain = transform
        transform = lambda row: plain(row, tokenizer=tokenizer)  # noqa: E731
    rows = list(read_rows(spec.path, spec.ds_type, spec.data_files, spec.split, spec.name))
    if not rows:
        raise no_rows(spec.path)
    out = []
    for row in rows:
        values = row.check()  # a row that is not valid JSON stops here, naming its line
        counts.rows += 1
        try:
            result = transform(dict(values))
        except Exception as exc:
            raise LmforgeError(f"{spec.type.rpartition('/')[2]} raised {type(exc).__name__}: {exc}", where=row.where,
                               fix="fix the transform, or return None to skip such rows") from exc
        if result is None:
            counts.skipped += 1
            continue
        if not isinstance(result, Mapping) or "prompt" not in result:
            raise LmforgeError(f"the transform returned {str(result)[:60]!r}, with no 'prompt'", where=row.where,
                               fix="return a dict with a 'prompt' (messages or text) and the columns the rewards read")
        columns = {k: v for k, v in values.items() if k not in remove}
        columns.update(result)
        value = columns.pop("prompt")
        ids = render_prompt(value, tokenizer, template_kwargs, row.where)
        if len(ids) > max_tokens:
            ids, counts.truncated = ids[-max_tokens:], counts.truncated + 1
        out.append(Prompt(tuple(ids), value, columns))
    return out


def prepare_prompts(data: Any, tokenizer: Any, seed: int, cfg: Mapping[str, Any],
                    template_kwargs: Mapping[str, Any] | None = None) -> PromptSet:
    """The train and held-out prompts of `data` (a DataSection): test_datasets, or val_set_size of the rows."""
    counts = PromptSet([], [])
    train: list[Prompt] = []
    for index, spec in enumerate(data.datasets or []):
        train += prompts_of(spec, index, "datasets", tokenizer, cfg, data.sequence_len, template_kwargs, counts)
    held: list[Prompt] = []
    for index, spec in enumerate(data.test_datasets or []):
        held += prompts_of(spec, index, "test_datasets", tokenizer, cfg, data.sequence_len, template_kwargs, counts)
    if not train:
        raise LmforgeError(f"no prompts out of {counts.rows} rows ({counts.skipped} skipped by the transform)",
                           where="datasets", fix="check the data and its transform")
    if data.val_set_size and not data.test_datasets:
        count = int(data.val_set_size) if data.val_set_size >= 1 else max(1, round(len(train) * data.val_set_size))
        if count >= len(train):
            raise LmforgeError(f"val_set_size {data.val_set_size} leaves no training prompts out of {len(train)}",
                               where="val_set_size", fix="use a smaller share or count")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        chosen = set(order[:count])
        held = [train[i] for i in sorted(chosen)]
        train = [p for i, p in enumerate(train) if i not in chosen]
    counts.train, counts.eval = train, held
    counts.columns = tuple(sorted(train[0].columns))
    return counts
