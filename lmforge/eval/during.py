"""Generation metrics while training (``do_causal_lm_eval``): at each eval step, greedy answers to the first
``eval_causal_lm_examples`` rows of the eval split, scored with ``eval_causal_lm_metrics``.

The rows are the tokenized eval examples themselves (the very ones eval loss is computed on): the prompt is
every token before the first labelled one, the reference the first labelled run decoded. Generation goes
through the inference module's :class:`lmforge.infer.generate.Generator` on the model being trained (in eval
mode for the call, then back to train mode), so the answers are those ``lmforge inference`` would give.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.data.examples import IGNORE_INDEX, Example
from lmforge.eval.answers import choose_extractor, same_answer
from lmforge.eval.metrics import corpus_scores
from lmforge.eval.perplexity import NllSum, nll_sums
from lmforge.infer.generate import Generator, Sampling


@dataclass(frozen=True)
class EvalRow:
    prompt_ids: list[int]
    answer_ids: list[int]


def eval_rows(examples: Sequence[Example], count: int) -> list[EvalRow]:
    """Prompt and first labelled run of up to ``count`` examples (rows with no label or no prompt are skipped)."""
    rows = []
    for example in examples:
        labels = example.labels
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if not first:
            continue
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        rows.append(EvalRow(list(example.input_ids[:first]), list(example.input_ids[first:end])))
        if len(rows) == count:
            break
    return rows


def causal_lm_metrics(model: Any, tokenizer: Any, prompts: Any, rows: Sequence[EvalRow], metrics: Sequence[str],
                      max_new_tokens: int, batch_size: int, extractor: str = "auto", pattern: str | None = None) -> dict[str, float]:
    """``eval_causal_lm_metrics`` of greedy answers to ``rows``, as ``causal_lm/<metric>`` (0-100; perplexity as is)."""
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    try:
        generator = Generator(model, tokenizer, prompts, Sampling(max_new_tokens=max_new_tokens))
        stop = set(generator.stop_token_ids)
        outputs = []
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            with generator.lock:
                new = generator.generate_ids([r.prompt_ids for r in chunk], generator.sampling)
            for row in new.tolist():
                end = next((i for i, t in enumerate(row) if t in stop), len(row))
                outputs.append(tokenizer.decode(row[:end], skip_special_tokens=True))
        references = [tokenizer.decode(r.answer_ids, skip_special_tokens=True).strip() for r in rows]
        scores: dict[str, float] = {}
        if "exact_match" in metrics:
            chosen = choose_extractor(extractor, pattern, references)
            hits = [same_answer(chosen.extract(o), chosen.reference(r)) for o, r in zip(outputs, references)]
            scores["exact_match"] = 100.0 * sum(hits) / len(hits)
        scores.update(corpus_scores(outputs, references, [m for m in metrics if m not in ("exact_match", "perplexity")]))
        if "perplexity" in metrics:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            total = NllSum()
            for s in nll_sums(model, [(r.prompt_ids + r.answer_ids, len(r.prompt_ids)) for r in rows], batch_size, pad):
                total.add(s)
            if total.perplexity is not None:
                scores["perplexity"] = total.perplexity
    finally:
        model.train(was_training)
    return {f"causal_lm/{k}": float(v) for k, v in scores.items()}
