"""Rows → token ids and labels: formats applied, BOS/EOS added, prompts masked, lengths enforced.

Nothing is dropped silently: malformed rows (with ``skip_bad_rows``), rows a hook skipped,
truncated rows and rows left with no trainable token are counted in :class:`PrepareStats`,
which the training log and ``lmforge preprocess`` print.

Two ways to tokenize a row's segments:
- template formats (alpaca, user-defined, completion, input_output): each segment is tokenized
  on its own, as at inference where the prompt is tokenized and the response generated after it;
  BOS (when the tokenizer adds one) and EOS are added;
- formats that render their own special tokens (chat templates): the joined text is tokenized
  once, so the ids are exactly those of the whole rendering; each token is labelled by the
  segment its last character falls in (offsets from the fast tokenizer).
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from typing import Any

import numpy as np

from lmforge.config.sections import DataSection, DatasetSpec
from lmforge.data.examples import IGNORE_INDEX, ROW_FIX, Example, PrepareStats, PreparedData, trained_token_mask
from lmforge.data.formats import ChatTemplateFormat, MistralChatFormat, Segment, SkipRow, get_format, is_mistral_common
from lmforge.data.formats.mistral import ImageRows
from lmforge.data.images import dataset_folder, has_images, image_examples
from lmforge.data.sources import no_rows, read_rows
from lmforge.errors import LmforgeError

PARALLEL_MIN_ROWS = 2000  # below this, starting processes costs more than it saves


def adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def _finish(ids: list[int], labels: list[int], sequence_len: int, stats: PrepareStats, out: list[Example]) -> None:
    if len(ids) > sequence_len:
        stats.truncated += 1
        ids, labels = ids[:sequence_len], labels[:sequence_len]
    # The model sees labels shifted by one, so the first position never counts.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        stats.no_trainable_tokens += 1
        return
    stats.tokens += len(ids)
    stats.label_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
    out.append(Example(ids, labels))


def _trained_spans(segments: list[Segment]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for segment in segments:
        end = start + len(segment.text)
        if segment.train and end > start:
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        start = end
    return spans


def _tokenize_joint(rows: list[list[Segment]], tokenizer: Any, sequence_len: int, train_on_inputs: bool, stats: PrepareStats) -> list[Example]:
    """Each row's segments joined and tokenized as one string; a token is trained when it overlaps trained text."""
    texts = ["".join(s.text for s in segment_list) for segment_list in rows]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {"input_ids": [], "offset_mapping": []}
    examples: list[Example] = []
    for segment_list, ids, offsets in zip(rows, encoded["input_ids"], encoded["offset_mapping"]):
        if train_on_inputs:
            labels = list(ids)
        else:
            mask = trained_token_mask(offsets, _trained_spans(segment_list))
            labels = np.where(mask, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
        _finish(list(ids), labels, sequence_len, stats, examples)
    return examples


def _encoded_rows(rows: list[list[Any]], sequence_len: int, train_on_inputs: bool, stats: PrepareStats) -> list[Example]:
    """Rows a format encoded to ids itself (mistral-common's TokenSegments): joined, the untrained runs masked."""
    examples: list[Example] = []
    for runs in rows:
        ids = [t for run in runs for t in run.ids]
        labels = [t if (run.train or train_on_inputs) else IGNORE_INDEX for run in runs for t in run.ids]
        kept = len(examples)
        _finish(ids, labels, sequence_len, stats, examples)
        images = next((run.images for run in runs if run.images is not None), None)
        if images is not None and len(examples) > kept:
            examples[-1].images = images  # an image row mistral-common encoded: its pixels go with its ids
    return examples


def tokenize_rows(
    rows: list[list[Segment]], tokenizer: Any, sequence_len: int, train_on_inputs: bool, stats: PrepareStats, joint: bool = False
) -> list[Example]:
    """Tokenize segment lists in one batched call; truncate to sequence_len; mask untrained segments.

    ``joint`` (formats that render their own special tokens): tokenize each row's text whole and
    add no BOS/EOS; otherwise each segment separately, with BOS (if the tokenizer adds one) and EOS.
    """
    if joint:
        return _tokenize_joint(rows, tokenizer, sequence_len, train_on_inputs, stats)
    flat = [segment.text for segment_list in rows for segment in segment_list]
    encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos = tokenizer.eos_token_id
    examples: list[Example] = []
    cursor = 0
    for segment_list in rows:
        ids: list[int] = list(bos)
        labels: list[int] = [IGNORE_INDEX] * len(bos)
        for segment in segment_list:
            piece = encoded[cursor]
            cursor += 1
            ids += piece
            labels += piece if (segment.train or train_on_inputs) else [IGNORE_INDEX] * len(piece)
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
        _finish(ids, labels, sequence_len, stats, examples)
    return examples




def _format_rows(fmt: Any, rows: list[tuple[dict[str, Any] | None, str, str | None]], skip_bad_rows: bool, stats: PrepareStats) -> list[list[Segment]]:
    out = []
    chat = isinstance(fmt, ChatTemplateFormat)
    for values, where, error in rows:
        if error is not None:
            if not skip_bad_rows:
                raise LmforgeError(error, where=where, fix=ROW_FIX)
            stats.bad(where, error)
            continue
        try:
            if chat and has_images(values):  # a text template would drop the image parts and train on the words alone
                raise LmforgeError("this row has images, and the model is trained as a text-only model",
                                   where=where, fix="set processor_type: AutoProcessor with an image-text base_model, "
                                   "or remove the image rows (skip_bad_rows: true skips and counts them)")
            out.append(fmt.segments(values, where))
        except SkipRow:
            stats.hook_skipped += 1
        except LmforgeError as exc:
            if not skip_bad_rows:
                exc.fix = exc.fix or ROW_FIX
                raise
            stats.bad(where, exc.message)
    return out


def spec_rows(spec: DatasetSpec) -> list[tuple[dict[str, Any] | None, str, str | None]]:
    return [(row.values, row.where, row.error) for row in read_rows(spec.path, spec.ds_type, spec.data_files, spec.split, spec.name)]


# Work shipped to tokenizer processes: set once per process by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = tokenizer


def _work(job: tuple) -> tuple[list[Example], PrepareStats]:
    fmt, rows, sequence_len, train_on_inputs, skip_bad_rows = job
    stats = PrepareStats()
    segments = _format_rows(fmt, rows, skip_bad_rows, stats)
    if getattr(fmt, "encodes_ids", False):
        return _encoded_rows(segments, sequence_len, train_on_inputs, stats), stats
    joint = getattr(fmt, "renders_special_tokens", False)
    return tokenize_rows(segments, _WORKER["tokenizer"], sequence_len, train_on_inputs, stats, joint=joint), stats


def prepare_specs(
    specs: list[DatasetSpec], data: DataSection, tokenizer: Any, key: str = "datasets", processes: int | None = None,
    processor: Any = None,
) -> tuple[list[Example], PrepareStats, list[int]]:
    """Read, format and tokenize dataset entries; returns examples, stats and each example's entry index.
    With a `processor` (an image-text model's), the rows are image chats (lmforge.data.images)."""
    stats = PrepareStats()
    examples: list[Example] = []
    origin: list[int] = []
    processes = processes or data.dataset_processes or 1
    for index, spec in enumerate(specs):
        where = f"{key}[{index}]"
        if processor is not None and not is_mistral_common(processor):
            rows = spec_rows(spec)
            if not rows:
                raise no_rows(spec.path)
            spec_stats = PrepareStats()
            spec_stats.rows[spec.path] += len(rows)
            spec_examples = image_examples(spec, where, rows, data, processor, spec_stats)
            stats.add(spec_stats)
            examples += spec_examples
            origin += [index] * len(spec_examples)
            continue
        fmt = get_format(spec.type, where=f"{where}.type", spec=spec, tokenizer=tokenizer, data=data)
        if processor is not None and isinstance(fmt, MistralChatFormat):  # mistral-common encodes the images itself
            fmt = replace(fmt, images=ImageRows(dataset_folder(spec.path), data.image_size, data.image_resize_algorithm,
                                                data.sequence_len))
        rows = spec_rows(spec)
        if not rows:
            raise no_rows(spec.path)  # a Hub split; a local file says so as it is read
        spec_stats = PrepareStats()
        spec_stats.rows[spec.path] += len(rows)
        # (a format holding mistral-common's tokenizer encodes in this process: the pool ships formats, not tokenizers)
        if processes > 1 and len(rows) >= PARALLEL_MIN_ROWS and not getattr(fmt, "encodes_ids", False):
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            size = -(-len(rows) // (processes * 4))
            jobs = [(fmt, rows[i : i + size], data.sequence_len, data.train_on_inputs, data.skip_bad_rows) for i in range(0, len(rows), size)]
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker, initargs=(tokenizer,)) as pool:
                results = list(pool.map(_work, jobs))
            spec_examples = [e for part, _ in results for e in part]
            for _, part_stats in results:
                spec_stats.add(part_stats)
        else:
            _WORKER["tokenizer"] = tokenizer
            spec_examples, part_stats = _work((fmt, rows, data.sequence_len, data.train_on_inputs, data.skip_bad_rows))
            spec_stats.add(part_stats)
        stats.add(spec_stats)
        examples += spec_examples
        origin += [index] * len(spec_examples)
    return examples, stats, origin


def rows_to_segments(spec: DatasetSpec, index: int, stats: PrepareStats, tokenizer: Any = None, chat_template: str | None = None, skip_bad_rows: bool = False) -> list[list[Segment]]:
    """Read one dataset entry and apply its format; a bad row raises with its file:line (or is counted)."""
    fmt = get_format(spec.type, where=f"datasets[{index}].type", spec=spec, tokenizer=tokenizer, chat_template=chat_template)
    rows = spec_rows(spec)
    if not rows:
        raise no_rows(spec.path)  # a Hub split; a local file says so as it is read
    stats.rows[spec.path] += len(rows)
    return _format_rows(fmt, rows, skip_bad_rows, stats)


def split_eval(examples: list[Example], val_set_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a share (<1) or a count (>=1) of examples, chosen by seed."""
    if not val_set_size:
        return examples, []
    count = int(val_set_size) if val_set_size >= 1 else max(1, round(len(examples) * val_set_size))
    if count >= len(examples):
        raise LmforgeError(
            f"val_set_size {val_set_size} leaves no training examples out of {len(examples)}",
            where="val_set_size",
            fix="use a smaller share or count",
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _no_examples(stats: PrepareStats, data: DataSection) -> LmforgeError:
    total = sum(stats.rows.values())
    return LmforgeError(
        f"no usable examples out of {total} rows: {stats.bad_rows} bad, {stats.hook_skipped} skipped by the hook, "
        f"{stats.no_trainable_tokens} with no response token left after truncation to {data.sequence_len}",
        where="sequence_len" if stats.no_trainable_tokens else "datasets",
        fix=f"raise sequence_len above {data.sequence_len}" if stats.no_trainable_tokens else "check the data and its type",
    )


def _identity(example: Example) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(example.input_ids), tuple(example.labels)


def _keep(examples: list[Example], data: DataSection, stats: PrepareStats, seen: set | None = None) -> list[Example]:
    """min_sample_len drops examples of fewer tokens; dataset_exact_deduplication keeps the first of identical
    tokenized examples (and, for eval data, drops those the training data holds), as axolotl does."""
    kept = [e for e in examples if len(e) >= data.min_sample_len] if data.min_sample_len else examples
    if data.dataset_exact_deduplication:
        seen = set(seen or ())
        unique = []
        for example in kept:
            identity = _identity(example)
            if identity not in seen:
                seen.add(identity)
                unique.append(example)
        kept = unique
    stats.dropped += len(examples) - len(kept)
    return kept


def build(data: DataSection, tokenizer: Any, seed: int, processor: Any = None) -> PreparedData:
    """Every dataset entry read, formatted, tokenized, mixed and split into train and eval (no cache)."""
    examples, stats, _ = prepare_specs(data.datasets, data, tokenizer, processor=processor)
    examples = _keep(examples, data, stats)
    if not examples:
        raise _no_examples(stats, data)
    if data.shuffle_merged_datasets and len(data.datasets) > 1:
        random.Random(seed).shuffle(examples)
    if data.test_datasets:
        if data.val_set_size:
            raise LmforgeError("set either val_set_size or test_datasets, not both", where="val_set_size", fix="remove one")
        held_out, eval_stats, _ = prepare_specs(data.test_datasets, data, tokenizer, key="test_datasets", processor=processor)
        held_out = _keep(held_out, data, eval_stats, seen={_identity(e) for e in examples})
        if not held_out:
            raise _no_examples(eval_stats, data)
        return PreparedData(examples, held_out, stats)
    train, held_out = split_eval(examples, data.val_set_size, seed)
    return PreparedData(train, held_out, stats)


def prepare(data: DataSection, tokenizer: Any, seed: int, save: bool | None = None,
            default_root: str | os.PathLike | None = None, processor: Any = None) -> PreparedData:
    """Prepared data for a config: from the prepared-data cache when one matches, else built.

    The cache (``dataset_prepared_path``, else `default_root`, else ``last_run_prepared``) is read
    whenever an entry with the same key exists; it is written when ``save`` is true, or (``save=None``)
    when ``dataset_prepared_path`` is set in the config. ``stats.note`` says which happened.
    """
    from lmforge.data import cache

    if processor is not None:  # the cache stores token ids only: image chats are prepared for each run
        prepared = build(data, tokenizer, seed, processor)
        prepared.stats.note = "image chats prepared in memory (the prepared-data cache holds token ids only)"
        return prepared
    if data.skip_prepare_dataset:  # this run's rows only, in memory: no cache read or written
        prepared = build(data, tokenizer, seed)
        prepared.stats.note = "prepared in memory (skip_prepare_dataset: the prepared-data cache is not used)"
        return prepared
    root = str(data.dataset_prepared_path or default_root or cache.DEFAULT_PREPARED_PATH)
    key = cache.cache_key(data, tokenizer, seed)
    damage = None
    try:
        found = cache.load(root, key)
    except cache.DamagedEntry as exc:  # rebuilt and rewritten below, never trusted
        found, damage = None, f"prepared data {os.path.join(root, key)} was damaged ({exc}); rebuilt it"
    if found is not None:
        found.stats.note = f"reused prepared data {os.path.join(root, key)}"
        return found
    prepared = build(data, tokenizer, seed)
    if damage or save or (save is None and data.dataset_prepared_path):
        folder = cache.save(root, key, prepared)
        prepared.stats.note = f"{damage}, saved to {folder}" if damage else f"prepared data saved to {folder}"
    return prepared
