"""Scores of generated text against references, each computed by the library that defines it.

- BLEU, chrF and TER: ``sacrebleu`` (corpus-level, its default tokenisation; the numbers papers quote);
- ROUGE-L and token F1: ``rouge-score`` (Google's reference implementation). Token F1 is its ROUGE-1 F-measure:
  the harmonic mean of unigram precision and recall over the multiset overlap, which is SQuAD's token F1 with
  rouge-score's tokenizer (lower-cased alphanumeric words) in place of SQuAD's article stripping;
- exact match: :mod:`lmforge.eval.answers` (answer extraction, then lm-eval's gsm8k normalisation).

All scores are on a 0-100 scale (sacrebleu's), so one table and one chart hold them; perplexity is
:mod:`lmforge.eval.perplexity`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmforge.errors import LmforgeError

TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "chrf", "ter")
# axolotl's eval_causal_lm_metrics names → lmforge's (perplexity is the eval loss's, computed on the same batches).
CAUSAL_LM_METRICS = {"sacrebleu": "bleu", "bleu": "bleu", "chrf": "chrf", "ter": "ter", "exact_match": "exact_match",
                     "rouge": "rouge_l", "rouge_l": "rouge_l", "token_f1": "token_f1", "perplexity": "perplexity"}


def metric_names(names: Sequence[str], where: str) -> list[str]:
    """lmforge metric names for the names a user wrote (axolotl's or lmforge's); unknown ones refused by name."""
    out = []
    for name in names:
        known = CAUSAL_LM_METRICS.get(str(name).lower())
        if known is None:
            raise LmforgeError(f"unknown metric '{name}'", where=where,
                               fix=f"use some of: {', '.join(sorted(CAUSAL_LM_METRICS))}")
        if known not in out:
            out.append(known)
    return out


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-example ROUGE-L and ROUGE-1 (token F1) F-measures, 0-100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL", "rouge1"])
    rows = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {"rouge_l": [100 * r["rougeL"].fmeasure for r in rows], "token_f1": [100 * r["rouge1"].fmeasure for r in rows]}


def corpus_scores(predictions: Sequence[str], references: Sequence[str], names: Sequence[str] = TEXT_METRICS) -> dict[str, float]:
    """Corpus-level BLEU / chrF / TER (sacrebleu) and mean ROUGE-L / token F1 (rouge-score), as asked in ``names``."""
    import sacrebleu

    preds, refs = list(predictions), [list(references)]
    scores: dict[str, float] = {}
    if not preds:
        return scores
    if "bleu" in names:
        scores["bleu"] = sacrebleu.corpus_bleu(preds, refs).score
    if "chrf" in names:
        scores["chrf"] = sacrebleu.corpus_chrf(preds, refs).score
    if "ter" in names:
        scores["ter"] = sacrebleu.corpus_ter(preds, refs).score
    if "rouge_l" in names or "token_f1" in names:
        per = rouge_scores(preds, references)
        for key in ("rouge_l", "token_f1"):
            if key in names:
                scores[key] = sum(per[key]) / len(per[key])
    return scores


def library_versions() -> dict[str, Any]:
    """Versions of the libraries behind the numbers (written into eval.json)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {}
    for name in ("lmforge", "torch", "transformers", "peft", "lm_eval", "sacrebleu", "rouge_score", "evaluate"):
        try:
            out[name] = version(name.replace("_", "-")) if name != "lmforge" else version("lmforge")
        except PackageNotFoundError:
            out[name] = None
    return out
