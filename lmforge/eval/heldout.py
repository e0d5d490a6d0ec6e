"""Task metrics on held-out data in the training format: batched greedy answers, scored against the references.

Held-out rows come, in this order of preference, from ``--data FILE`` (read with the first dataset's
``type:``, so a test file in the training data's shape needs no config change), the config's
``test_datasets``, or the ``val_set_size`` share of ``datasets`` picked with the run's seed (the rows
``train`` held out, unless it dropped rows it could not use). Each row goes through the same format
object training used (:func:`lmforge.data.formats.get_format`): the prompt is every segment before the
first trained one, wrapped as inference wraps it (BOS where training adds it); the reference is the
first trained segment without its end-of-turn marker.

Answers come from the inference module's :class:`lmforge.infer.generate.Generator` (one left-padded
batch per ``batch_size`` prompts, the longest in tokens first so a batch pads little), greedy, stopping at the
format's end-of-turn tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.data.formats import EncodedPrompt, TokenSegment, get_format
from lmforge.data.prepare import split_eval
from lmforge.data.sources import read_rows
from lmforge.errors import LmforgeError
from lmforge.eval.answers import Extractor, same_answer
from lmforge.eval.metrics import corpus_scores, rouge_scores
from lmforge.eval.perplexity import answer_perplexity
from lmforge.infer.generate import Generator, Sampling


@dataclass(frozen=True)
class HeldOutExample:
    where: str  # file:line of the row
    prompt: str  # the prompt as training rendered it (formatted, BOS included where training adds it)
    reference: str  # the trained response, without its end-of-turn marker


def _strip_end(text: str, markers: Sequence[str]) -> str:
    changed = True
    while changed:
        changed = False
        stripped = text.rstrip()
        for marker in markers:
            if marker and stripped.endswith(marker):
                text, changed = stripped[: -len(marker)], True
    return text.strip()


def held_out_examples(cfg: Any, tokenizer: Any, builder: Any, data_path: str | None = None) -> tuple[list[HeldOutExample], str]:
    """The held-out rows (see the module docstring) and a phrase naming where they came from."""
    d = cfg.data
    if not d.datasets:
        raise LmforgeError("task metrics read held-out rows in the training format, and this config has no datasets",
                           where="datasets", fix="evaluate a fine-tuning config, or run only --tasks (lm-eval)")
    if data_path:
        specs, key, source = [d.datasets[0].model_copy(update={"path": data_path, "data_files": None, "split": "test"})], "--data", data_path
    elif d.test_datasets:
        specs, key, source = list(d.test_datasets), "test_datasets", "test_datasets"
    elif d.val_set_size:
        specs, key, source = list(d.datasets), "datasets", f"val_set_size {d.val_set_size:g} of datasets (seed {cfg.training.seed})"
    else:
        raise LmforgeError("no held-out data: the config sets neither test_datasets nor val_set_size", where="lmforge eval",
                           fix="pass --data FILE (rows shaped like the training data), or set test_datasets / val_set_size")
    markers = [t for t in (tokenizer.all_special_tokens or []) if t] + list(getattr(builder, "end_markers", []) or [])
    rl = getattr(cfg, "rl", None)
    if rl is not None and (rl.preference or rl.rl == "grpo"):
        # A preference or GRPO run's held-out rows are pairs or prompts: read them as its training read them,
        # so the held-out split is the one training held out.
        held = d if key != "--data" else d.model_copy(update={"test_datasets": specs})
        read = _prompt_set_examples if rl.rl == "grpo" else _preference_examples
        return read(cfg, held, tokenizer, builder, markers), source
    examples: list[HeldOutExample] = []
    for index, spec in enumerate(specs):
        where_type = f"{key}[{index}].type" if key != "--data" else "datasets[0].type"
        fmt = get_format(spec.type, where=where_type, spec=spec, tokenizer=tokenizer, data=d)
        if not hasattr(fmt, "segments"):
            continue  # a format with no prompt/response segments: the caller says there is nothing to answer
        for row in read_rows(spec.path, spec.ds_type, spec.data_files, spec.split, spec.name):
            segments = fmt.segments(row.check(), row.where)
            first = next((i for i, s in enumerate(segments) if s.train), None)
            if first is None or first == 0:
                continue  # no prompt to answer, or nothing trained: not a question with a reference
            prompt = "".join(s.text for s in segments[:first])
            if isinstance(segments[0], TokenSegment):  # mistral-common's ids: the prompt is those ids, not its text
                prompt = EncodedPrompt(prompt, [t for s in segments[:first] for t in s.ids])
            examples.append(HeldOutExample(row.where, builder.wrap(prompt), _strip_end(segments[first].text, markers)))
    if key == "datasets":
        _, examples = split_eval(examples, d.val_set_size, cfg.training.seed)
    return examples, source


def _preference_examples(cfg: Any, data: Any, tokenizer: Any, builder: Any, markers: Sequence[str]) -> list[HeldOutExample]:
    """Held-out pairs (KTO: its desirable answers): the prompt, and the chosen answer as the reference."""
    from lmforge.data.preference import PreferencePair, prepare_preferences

    prepared = prepare_preferences(data, tokenizer, cfg.training.seed, kto=cfg.rl.rl == "kto", max_prompt_len=cfg.rl.max_prompt_len)
    examples = []
    for index, row in enumerate(prepared.eval):
        answer = row.chosen_ids if isinstance(row, PreferencePair) else row.completion_ids if row.desirable else None
        if answer is not None:
            examples.append(HeldOutExample(f"held-out pair {index + 1}", builder.wrap(tokenizer.decode(row.prompt_ids)),
                                           _strip_end(tokenizer.decode(answer, skip_special_tokens=True), markers)))
    return examples


REFERENCE_COLUMNS = ("answer", "reference", "solution", "ground_truth", "target")


def _prompt_set_examples(cfg: Any, data: Any, tokenizer: Any, builder: Any, markers: Sequence[str]) -> list[HeldOutExample]:
    """GRPO's held-out prompts, each with the reference its row carries (the first of REFERENCE_COLUMNS)."""
    from lmforge.data.prompt_sets import prepare_prompts

    prompts = prepare_prompts(data, tokenizer, cfg.training.seed, cfg.flat(), cfg.rl.trl.chat_template_kwargs)
    name = next((c for c in REFERENCE_COLUMNS if c in prompts.columns), None)
    if name is None:
        raise LmforgeError(f"the held-out prompts carry no reference answer (their columns: {', '.join(prompts.columns) or 'none'})",
                           where="datasets[0].type",
                           fix=f"have the prompt transform return one of {', '.join(REFERENCE_COLUMNS)}, or run only --tasks")
    return [HeldOutExample(f"held-out prompt {index + 1}", builder.wrap(tokenizer.decode(list(p.ids))),
                           _strip_end(str(p.columns[name]), markers)) for index, p in enumerate(prompts.eval)]


@dataclass
class TaskResult:
    """Scores (0-100, perplexity as is) and what they were computed from."""

    scores: dict[str, float | None]
    records: list[dict[str, Any]]
    extract_misses: int
    generated_tokens: int
    generation_seconds: float
    examples: int
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0


def generate_answers(generator: Generator, prompts: Sequence[str], sampling: Sampling, batch_size: int) -> tuple[list[Any], float]:
    """Completions in input order, generated longest prompt first in batches; and the seconds generation took."""
    lengths = [len(generator.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # by tokens: a batch of near-equal rows pads least
    results: list[Any] = [None] * len(prompts)
    started = time.perf_counter()
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        for i, completion in zip(chunk, generator.complete_batch([prompts[i] for i in chunk], sampling)):
            results[i] = completion
    return results, time.perf_counter() - started


def score_task(generator: Generator, examples: Sequence[HeldOutExample], extractor: Extractor, metrics: Sequence[str],
               max_new_tokens: int, batch_size: int = 8, seed: int | None = None) -> TaskResult:
    """Greedy answers to ``examples``, scored with ``metrics`` (names from lmforge.eval.metrics.CAUSAL_LM_METRICS)."""
    if not examples:
        raise LmforgeError("no held-out examples to evaluate", where="held-out data", fix="give rows with a prompt and a response")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    completions, seconds = generate_answers(generator, [e.prompt for e in examples], sampling, batch_size)
    outputs = [c.text for c in completions]
    references = [e.reference for e in examples]
    predicted = [extractor.extract(o) for o in outputs]
    wanted = [extractor.reference(r) for r in references]
    correct = [same_answer(p, w) for p, w in zip(predicted, wanted)]
    misses = sum(p is None for p in predicted)
    scores: dict[str, float | None] = {}
    if "exact_match" in metrics:
        scores["exact_match"] = 100.0 * sum(correct) / len(correct)
    scores.update(corpus_scores(outputs, references, [m for m in metrics if m != "exact_match"]))
    per_rouge = rouge_scores(outputs, references)
    if "perplexity" in metrics:
        scores["perplexity"], _ = answer_perplexity(generator.model, generator.tokenizer, [e.prompt for e in examples],
                                                    references, batch_size=max(1, batch_size // 2))
    records = [
        {"where": e.where, "prompt": e.prompt, "reference": e.reference, "output": c.text, "finish_reason": c.finish_reason,
         "completion_tokens": c.completion_tokens, "extracted": p, "reference_answer": w, "correct": ok,
         "rouge_l": round(per_rouge["rouge_l"][i], 4), "token_f1": round(per_rouge["token_f1"][i], 4)}
        for i, (e, c, p, w, ok) in enumerate(zip(examples, completions, predicted, wanted, correct))
    ]
    notes = []
    if misses:
        notes.append(f"the {extractor.name} extractor found no answer in {misses} of {len(examples)} outputs (counted as misses)")
    return TaskResult(scores, records, misses, sum(c.completion_tokens for c in completions), seconds, len(examples), notes)
