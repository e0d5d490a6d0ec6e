"""Data quality report: what the datasets hold once formatted and tokenized.

Rows per source, tokens, a token-length histogram, truncation, empty fields, exact and near
duplicates, train/eval overlap, share of label tokens and bad rows, as Markdown (+ PNG).
Near duplicates: rows whose text, lower-cased with punctuation and spacing removed, is the same
(a cheap normalization that catches copy-paste variants; no fuzzy matching).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_file, write_text
from lmforge.config.sections import DataSection
from lmforge.data.examples import IGNORE_INDEX, Example, PrepareStats
from lmforge.data.prepare import prepare_specs, split_eval
from lmforge.data.sources import read_rows

_NORMALIZE = re.compile(r"[\W_]+", re.UNICODE)


@dataclass
class Report:
    stats: PrepareStats
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    sequence_len: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    overlap: int = 0
    eval_rows: int = 0
    empty_fields: Counter = field(default_factory=Counter)

    def markdown(self, png: str | None) -> str:
        s = self.stats
        lines = ["# Data report", "", "| source | rows read | examples | tokens | label tokens |", "| --- | ---: | ---: | ---: | ---: |"]
        for source, row in self.per_source.items():
            lines.append(f"| {source} | {row['rows']:,} | {row['examples']:,} | {row['tokens']:,} | {row['labels']:,} |")
        lengths = np.asarray(self.lengths or [0])
        lines += [
            "",
            f"- examples: {len(self.lengths):,}; tokens: {s.tokens:,}; label tokens: {s.label_tokens:,} ({s.label_tokens / max(s.tokens, 1):.1%})",
            f"- token length: min {lengths.min()}, median {int(np.median(lengths))}, p95 {int(np.percentile(lengths, 95))}, max {lengths.max()} (sequence_len {self.sequence_len})",
            f"- truncated to sequence_len: {s.truncated:,}; no trainable token left (skipped): {s.no_trainable_tokens:,}",
            f"- bad rows skipped: {s.bad_rows:,}; skipped by a type hook: {s.hook_skipped:,}",
            f"- empty fields: {', '.join(f'{k}: {v:,}' for k, v in self.empty_fields.most_common()) or 'none'}",
            f"- exact duplicate examples: {self.exact_duplicates:,}; near duplicates (same text ignoring case, spacing, punctuation): {self.near_duplicates:,}",
            f"- train/eval overlap: {self.overlap:,} of {self.eval_rows:,} eval examples also in train",
        ]
        if s.bad_examples:
            lines += ["", "Bad rows (first few):", ""] + [f"- `{b}`" for b in s.bad_examples[:10]]
        lines += ["", "## Token lengths", "", "```", *text_histogram(self.lengths), "```"]
        if png:
            lines += ["", f"![token lengths]({png})"]
        return "\n".join(lines) + "\n"


def text_histogram(lengths: list[int], bins: int = 12, width: int = 40) -> list[str]:
    if not lengths:
        return ["(no examples)"]
    counts, edges = np.histogram(lengths, bins=bins)
    top = max(counts.max(), 1)
    return [f"{int(edges[i]):>6}-{int(edges[i + 1]):<6} {'#' * round(width * c / top):<{width}} {c:,}" for i, c in enumerate(counts)]


def _empty_fields(data: DataSection) -> Counter:
    empty: Counter = Counter()
    for spec in data.datasets:
        for row in read_rows(spec.path, spec.ds_type, spec.data_files, spec.split, spec.name):
            for key, value in (row.values or {}).items():
                if value is None or (isinstance(value, (str, list, dict)) and not (value.strip() if isinstance(value, str) else value)):
                    empty[key] += 1
    return empty


def _digest(example: Example) -> bytes:
    return hashlib.blake2b(np.asarray(example.input_ids, dtype=np.int32).tobytes(), digest_size=16).digest()


def build_report(data: DataSection, tokenizer: Any, seed: int) -> Report:
    examples, stats, origin = prepare_specs(data.datasets, data, tokenizer)
    report = Report(stats=stats, sequence_len=data.sequence_len, lengths=[len(e) for e in examples])
    for index, spec in enumerate(data.datasets):
        mine = [e for e, o in zip(examples, origin) if o == index]
        row = report.per_source.setdefault(spec.path, {"rows": 0, "examples": 0, "tokens": 0, "labels": 0})
        row["rows"] = stats.rows[spec.path]
        row["examples"] += len(mine)
        row["tokens"] += sum(len(e) for e in mine)
        row["labels"] += sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in mine)
    digests = [_digest(e) for e in examples]
    report.exact_duplicates = len(digests) - len(set(digests))
    texts = [_NORMALIZE.sub("", tokenizer.decode(e.input_ids, skip_special_tokens=True).lower()) for e in examples]
    report.near_duplicates = len(texts) - len(set(texts)) - report.exact_duplicates
    if data.test_datasets:
        held, _, _ = prepare_specs(data.test_datasets, data, tokenizer, key="test_datasets")
        train = examples
    else:
        train, held = split_eval(examples, data.val_set_size, seed)
    train_set = {_digest(e) for e in train}
    report.eval_rows = len(held)
    report.overlap = sum(_digest(e) in train_set for e in held)
    report.empty_fields = _empty_fields(data)
    return report


def write_report(report: Report, folder: str | Path) -> tuple[Path, Path | None]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png: Path | None = folder / "data_report_lengths.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(report.lengths, bins=40, color="#4477aa")
        ax.axvline(report.sequence_len, color="#cc3311", linestyle="--", label=f"sequence_len {report.sequence_len}")
        ax.set_xlabel("tokens per example")
        ax.set_ylabel("examples")
        ax.legend()
        fig.tight_layout()
        atomic_file(png, lambda tmp: fig.savefig(tmp, dpi=100))
        plt.close(fig)
    except ImportError:  # the Markdown still holds the text histogram
        png = None
    md = folder / "data_report.md"
    write_text(md, report.markdown(png.name if png else None))
    return md, png
