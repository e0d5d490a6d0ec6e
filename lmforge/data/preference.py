"""Preference data for `rl:`: rows → (prompt, chosen, rejected) token ids, checked, truncated, batched.

One pair is one prompt shared by two answers. A micro-batch of B pairs is one forward of 2B rows
(chosen rows first, then rejected, TRL's "concatenated forward"), each row prompt + answer, right-padded;
the labels are -100 on the prompt and the padding, so every loss falls on the answers only.

Truncation follows TRL's ``max_prompt_length`` / ``max_length``: a pair longer than ``sequence_len``
keeps the *tail* of its prompt (at most ``max_prompt_len`` tokens, default half of sequence_len) and
the *head* of each answer. Every row is checked (:func:`prepare_preferences`): an empty answer is an
error (skip_bad_rows counts and skips it), a pair whose chosen and rejected answers are identical
teaches nothing and is counted and skipped, and a pair that had to be truncated is counted; all three
counts are reported with the data (``lmforge validate`` / ``preprocess`` / ``train`` print them).

KTO (``rl: kto``) rows are one answer each with a desirable/undesirable label; a KTO micro-batch also
carries the KL rows: each prompt with the batch's previous answer (TRL's cycled completions).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import write_json
from lmforge.data.batching import Batch
from lmforge.data.examples import IGNORE_INDEX, PrepareStats
from lmforge.data.formats.preference import CHAT_TEMPLATE_TYPES, CompletionText, PreferenceText, preference_format
from lmforge.data.formats.templates import resolve_template
from lmforge.data.examples import read_good_rows
from lmforge.data.prepare import adds_bos, spec_rows, split_eval
from lmforge.data.sources import no_rows
from lmforge.errors import LmforgeError


@dataclass
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_logps: tuple[float, float] | None = None  # (chosen, rejected) under the reference model: precompute_ref_log_probs

    def __len__(self) -> int:  # the longer of its two rows: what batching by length and padding see
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class LabelledCompletion:
    """One KTO row."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class PreferenceStats(PrepareStats):
    identical_skipped: int = 0  # chosen == rejected: no preference to learn
    too_long_skipped: int = 0  # the prompt alone fills sequence_len: no answer token left
    chosen_lengths: list[int] = field(default_factory=list)  # answer tokens, after truncation
    rejected_lengths: list[int] = field(default_factory=list)

    def summary(self) -> str:
        line = super().summary()
        extra = []
        if self.identical_skipped:
            extra.append(f"{self.identical_skipped} pairs with chosen == rejected skipped")
        if self.too_long_skipped:
            extra.append(f"{self.too_long_skipped} rows skipped (the prompt alone fills sequence_len)")
        return line + ("; " + ", ".join(extra) if extra else "")


@dataclass
class PreparedPreferences:
    train: list[Any]
    eval: list[Any]
    stats: PreferenceStats


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _answer_ids(tokenizer: Any, text: str) -> list[int]:
    """An answer's ids ending with EOS (as TRL appends it), unless its text already ends with it."""
    ids = _ids(tokenizer, text)
    eos = tokenizer.eos_token_id
    return ids if eos is None or ids[-1:] == [eos] else ids + [eos]


def fit(prompt: list[int], answers: list[list[int]], sequence_len: int, max_prompt_len: int) -> tuple[list[int], list[list[int]], bool]:
    """TRL's truncation: when prompt + longest answer exceeds sequence_len, the prompt keeps its last
    max_prompt_len tokens, then each answer its first (sequence_len - prompt) tokens. Returns (prompt, answers, truncated)."""
    if len(prompt) + max(len(a) for a in answers) <= sequence_len:
        return prompt, answers, False
    if len(prompt) > max_prompt_len:
        prompt = prompt[len(prompt) - max_prompt_len:]
    room = sequence_len - len(prompt)
    return prompt, [a[:max(room, 0)] for a in answers], True


def _tokenize(text: Any, tokenizer: Any, sequence_len: int, max_prompt_len: int, stats: PreferenceStats) -> Any:
    prompt = _ids(tokenizer, text.prompt)
    bos = tokenizer.bos_token_id
    if adds_bos(tokenizer) and prompt[:1] != [bos]:
        prompt = [bos] + prompt
    answers = [_answer_ids(tokenizer, text.chosen), _answer_ids(tokenizer, text.rejected)] if isinstance(text, PreferenceText) \
        else [_answer_ids(tokenizer, text.completion)]
    prompt, answers, truncated = fit(prompt, answers, sequence_len, max_prompt_len)
    if min(len(a) for a in answers) == 0:
        stats.too_long_skipped += 1
        return None
    stats.truncated += truncated
    stats.tokens += len(prompt) * len(answers) + sum(len(a) for a in answers)
    stats.label_tokens += sum(len(a) for a in answers)
    if isinstance(text, PreferenceText):
        stats.chosen_lengths.append(len(answers[0]))
        stats.rejected_lengths.append(len(answers[1]))
        return PreferencePair(prompt, answers[0], answers[1])
    (stats.chosen_lengths if text.desirable else stats.rejected_lengths).append(len(answers[0]))
    return LabelledCompletion(prompt, answers[0], text.desirable)


def preference_rows(specs: list[Any], data: Any, tokenizer: Any, kto: bool, stats: PreferenceStats, key: str = "datasets",
                    max_prompt_len: int | None = None) -> list[Any]:
    """Every row of `specs` formatted, checked and tokenized (pairs, or KTO's labelled completions)."""
    out: list[Any] = []
    prompt_room = max_prompt_len or data.sequence_len // 2
    for index, spec in enumerate(specs):
        where = f"{key}[{index}].type"
        template = None
        if spec.type in CHAT_TEMPLATE_TYPES:
            setting = spec.chat_template or data.chat_template
            jinja = spec.chat_template_jinja if spec.chat_template else data.chat_template_jinja
            template, _ = resolve_template(setting, tokenizer, where="chat_template", jinja=jinja)
        fmt = preference_format(spec.type, where, spec=spec, tokenizer=tokenizer, template=template, completion=kto)
        rows = spec_rows(spec)
        if not rows:
            raise no_rows(spec.path)
        stats.rows[spec.path] += len(rows)
        for _, text in read_good_rows(rows, fmt, data.skip_bad_rows, stats):
            if isinstance(text, PreferenceText) and text.chosen.strip() == text.rejected.strip():
                stats.identical_skipped += 1  # documented: counted and skipped, never trained
                continue
            example = _tokenize(text, tokenizer, data.sequence_len, prompt_room, stats)
            if example is not None:
                out.append(example)
    return out


def prepare_preferences(data: Any, tokenizer: Any, seed: int, kto: bool = False, max_prompt_len: int | None = None) -> PreparedPreferences:
    """The train and eval pairs of a config (val_set_size or test_datasets), prepared in memory."""
    stats = PreferenceStats()
    examples = preference_rows(data.datasets, data, tokenizer, kto, stats, max_prompt_len=max_prompt_len)
    if not examples:
        total = sum(stats.rows.values())
        raise LmforgeError(f"no usable preference rows out of {total}: {stats.bad_rows} bad, {stats.identical_skipped} with "
                           f"chosen == rejected, {stats.too_long_skipped} whose prompt fills sequence_len {data.sequence_len}",
                           where="datasets", fix="check the data, its type and sequence_len")
    if data.shuffle_merged_datasets and len(data.datasets) > 1:
        random.Random(seed).shuffle(examples)
    if data.test_datasets:
        held = preference_rows(data.test_datasets, data, tokenizer, kto, PreferenceStats(), key="test_datasets",
                               max_prompt_len=max_prompt_len)
        train, held_out = examples, held
    else:
        train, held_out = split_eval(examples, data.val_set_size, seed)
    stats.note = "prepared in memory (preference rows are not written to the prepared-data cache)"
    return PreparedPreferences(train, held_out, stats)


# precompute_ref_log_probs: the reference log-probabilities of every pair, stored beside the prepared data so a
# resumed run, or a second run on the same pairs and base model, reads them instead of running the reference again.
REFERENCE_STORE_VERSION = 1


def reference_store_path(root: str | Path, pairs: list[PreferencePair], reference: dict[str, Any]) -> Path:
    """The file holding `pairs`' reference log-probabilities under `reference` (what makes the numbers: base weights,
    quantization, compute dtype, batch size). The key hashes the pairs' token ids themselves, in order, so the stored
    values can only ever be paired with the rows they were computed for."""
    digest = hashlib.sha256(json.dumps({"version": REFERENCE_STORE_VERSION, "reference": reference},
                                       sort_keys=True, default=str).encode())
    for pair in pairs:
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return Path(root) / f"reference_logps-{digest.hexdigest()[:16]}.json"


def load_reference_logps(path: Path, pairs: list[PreferencePair]) -> bool:
    """Fill each pair's ref_logps from `path`; False (nothing changed) when there is no usable store."""
    try:
        stored = json.loads(path.read_text())["ref_logps"]
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: computed again and rewritten
        return False
    if not isinstance(stored, list) or len(stored) != len(pairs) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v) for v in stored):
        return False
    for pair, (chosen, rejected) in zip(pairs, stored):
        pair.ref_logps = (chosen, rejected)
    return True


def save_reference_logps(path: Path, pairs: list[PreferencePair]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"version": REFERENCE_STORE_VERSION, "pairs": len(pairs),
                      "ref_logps": [list(p.ref_logps) for p in pairs if p.ref_logps is not None]}, indent=0)


def _rows(prompts: list[list[int]], answers: list[list[int]], pad_token_id: int) -> Batch:
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        n, p = len(prompt) + len(answer), len(prompt)
        input_ids[row, :n] = torch.tensor(prompt + answer)
        labels[row, p:n] = torch.tensor(answer)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_pairs(pairs: list[PreferencePair], pad_token_id: int) -> Batch:
    """2B rows: the B chosen rows (prompt + chosen), then the B rejected rows; labels only on the answers."""
    prompts = [p.prompt_ids for p in pairs] * 2
    batch = _rows(prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_token_id)
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs], dtype=torch.float64)
    return batch


def collate_completions(rows: list[LabelledCompletion], pad_token_id: int) -> Batch:
    """KTO: B rows of prompt + answer with their labels, and the B KL rows (prompt i with answer i-1, as TRL cycles them)."""
    prompts = [r.prompt_ids for r in rows]
    answers = [r.completion_ids for r in rows]
    batch = _rows(prompts, answers, pad_token_id)
    kl = _rows(prompts, answers[-1:] + answers[:-1], pad_token_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["desirable"] = torch.tensor([r.desirable for r in rows], dtype=torch.bool)
    return batch


def collate_examples(examples: list[Any], pad_token_id: int) -> Batch:
    """The batch of preference pairs or of KTO rows."""
    if isinstance(examples[0], LabelledCompletion):
        return collate_completions(examples, pad_token_id)
    return collate_pairs(examples, pad_token_id)


def length_histogram(lengths: list[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) bins of token lengths, for the data report."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts = Counter((n - low) // step for n in lengths)
    return [(low + i * step, low + (i + 1) * step - 1, counts.get(i, 0)) for i in range((high - low) // step + 1)]


def report_lines(stats: PreferenceStats) -> list[str]:
    """The data report of preference rows: counts, then chosen and rejected answer-length histograms."""
    lines = [f"preference rows: {stats.summary()}"]
    for name, lengths in (("chosen", stats.chosen_lengths), ("rejected", stats.rejected_lengths)):
        if not lengths:
            continue
        top = max(c for _, _, c in length_histogram(lengths))
        lines.append(f"{name} answer tokens (n={len(lengths)}, mean {sum(lengths) / len(lengths):.0f}):")
        for lo, hi, count in length_histogram(lengths):
            lines.append(f"  {lo:>5}-{hi:<5} {'#' * max(1 if count else 0, round(30 * count / top))} {count}")
    return lines
