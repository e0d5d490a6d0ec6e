"""`lmforge eval`: the tuned model and its base on held-out data, lm-eval tasks and general text, in one table.

For each model (the base first, then the tuned one):
1. task metrics on held-out rows in the training format (lmforge.eval.heldout: batched greedy answers,
   exact match with answer extraction, token F1, ROUGE-L, BLEU, chrF, answer perplexity);
2. perplexity on general text that is not training data (``eval_general_text``: forgetting);
3. lm-eval tasks (``--tasks`` / ``lm_eval_tasks``, plus ``eval_general_tasks``) through lm-eval's own API on the
   loaded model (lmforge.eval.harness).
The base row is cached by the base weights' hash and the settings (lmforge.eval.cache). The report goes to
``OUTPUT/eval.json`` (numbers, versions, seed, prompt format, example count, lm-eval stderr), ``eval.md``,
``eval.png`` and ``outputs-<model>.jsonl`` (every generation, next to the scores).

Model sources (one loader, lmforge.models.trained): the config's base_model plus ``--lora_model_dir`` (an adapter
or a LoRA run's checkpoint), or ``--model`` (a merged folder, a .gguf file, a full fine-tune's output or
checkpoint folder; a folder holding an adapter is taken as one). Without either: the config's output_dir.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.atomic import write_json, write_text
from lmforge.config import LmforgeConfig
from lmforge.errors import LmforgeError
from lmforge.eval import cache
from lmforge.eval.answers import choose_extractor
from lmforge.eval.harness import check_tasks, headline, run_lm_eval
from lmforge.eval.heldout import held_out_examples, score_task
from lmforge.eval.metrics import library_versions, metric_names
from lmforge.eval.perplexity import text_perplexity
from lmforge.eval.report import bar_chart, gain_and_forgetting, markdown_table
from lmforge.recipes.console import say
from lmforge.recipes.inference import SamplingFlags, adapter_dir, build_generator


@dataclass
class EvalOptions:
    """`lmforge eval`'s flags; None means: take the config's key."""

    lora_model_dir: str | None = None
    model: str | None = None
    tasks: list[str] | None = None
    limit: int | None = None
    base: bool = True
    data: str | None = None
    output: str | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    cache: bool = True


def tuned_source(cfg: LmforgeConfig, options: EvalOptions) -> tuple[str | None, str | None]:
    """(model, adapter) of the tuned model: the flags, else the config's lora_model_dir, else its output_dir."""
    model, adapter = options.model, adapter_dir(cfg, options.lora_model_dir)
    if model and Path(model, "adapter_config.json").is_file() and not adapter:
        model, adapter = None, model  # a LoRA run's output or checkpoint folder given as --model
    if model is None and adapter is None:
        out = Path(cfg.training.output_dir)
        if (out / "adapter_config.json").is_file():
            adapter = str(out)
        elif (out / "config.json").is_file():
            model = str(out)
        else:
            raise LmforgeError(f"nothing trained in {out} (no adapter_config.json or config.json)", where="output_dir",
                               fix="train first, or pass --lora_model_dir ADAPTER or --model PATH (merged folder, .gguf, checkpoint)")
    return model, adapter


def run_eval(cfg: LmforgeConfig, options: EvalOptions) -> dict[str, Any]:
    """Evaluate as the module docstring says; returns what eval.json holds."""
    e = cfg.evaluation
    if options.limit is not None and options.limit < 1:
        raise LmforgeError(f"--limit must be at least 1, got {options.limit}", where="--limit",
                           fix="pass the number of held-out examples (and lm-eval documents) to score, or leave it out for all")
    if options.batch_size < 1:
        raise LmforgeError(f"--batch_size must be at least 1, got {options.batch_size}", where="--batch_size")
    metrics = metric_names(e.eval_metrics, "eval_metrics")
    tasks = list(options.tasks if options.tasks is not None else e.lm_eval_tasks)
    general_tasks = [t for t in e.eval_general_tasks if t not in tasks]
    every_task = tasks + general_tasks
    if every_task:
        check_tasks(every_task, where="--tasks" if options.tasks else "lm_eval_tasks / eval_general_tasks")  # before loading
    if e.eval_general_text and not Path(e.eval_general_text).is_file():
        raise LmforgeError(f"{e.eval_general_text} is not a file", where="eval_general_text",
                           fix="run from the repository root, name another text file, or set eval_general_text: null")
    trained_on = {str(Path(s.path).resolve()) for s in (cfg.data.datasets or []) + (cfg.pretrain.pretraining_dataset or [])
                  if getattr(s, "path", None)}
    if e.eval_general_text and str(Path(e.eval_general_text).resolve()) in trained_on:
        say(f"warning: eval_general_text {e.eval_general_text} is training data here, so its perplexity shows what was "
            "learned, not what was forgotten (name a text the run never saw)")
    model, adapter = tuned_source(cfg, options)
    limit = options.limit if options.limit is not None else e.lm_eval_limit
    flags = SamplingFlags(max_new_tokens=options.max_new_tokens, temperature=0.0)
    out_dir = Path(options.output or Path(cfg.training.output_dir) / "eval")

    rows = []
    if options.base:
        if cfg.model.base_model is None:
            raise LmforgeError("no base model to compare with: this config builds one from scratch", where="base_model",
                               fix="pass --no-base")
        rows.append(_model_row(cfg, "base", None, None, options, flags, metrics, every_task, limit, out_dir))
    rows.append(_model_row(cfg, "tuned", model, adapter, options, flags, metrics, every_task, limit, out_dir))

    lm_metrics = [name for name in rows[-1]["metrics"] if "/" in name]
    general = [n for n in lm_metrics if n.split("/")[0] in general_tasks]
    task_metric = "exact_match" if "exact_match" in rows[-1]["metrics"] else next(iter(rows[-1]["metrics"]), None)
    line = gain_and_forgetting(rows[0], rows[-1], task_metric, general) if len(rows) > 1 else ""
    report = {
        "models": rows,
        "gain_and_forgetting": line,
        "seed": cfg.training.seed,
        "prompt_format": rows[-1].get("prompt_format"),
        "versions": library_versions(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    write_json(out_dir / "eval.json", report)
    write_text(out_dir / "eval.md", f"# lmforge eval\n\n{table}\n{line}\n")
    bar_chart(out_dir / "eval.png", rows)
    print(table)
    if line:
        print(line)
    say(f"report: {out_dir / 'eval.md'}, {out_dir / 'eval.json'}, {out_dir / 'eval.png'}; outputs next to them")
    return report


def _model_row(cfg: LmforgeConfig, label: str, model: str | None, adapter: str | None, options: EvalOptions,
               flags: SamplingFlags, metrics: list[str], tasks: list[str], limit: float | None, out_dir: Path) -> dict[str, Any]:
    """One model's numbers (the base row from the cache when its weights and settings are unchanged)."""
    e = cfg.evaluation
    key = None
    if label == "base" and options.cache:
        settings = {"tasks": tasks, "limit": limit, "metrics": metrics, "data": _data_identity(cfg, options.data),
                    "extractor": [e.eval_answer_extractor, e.eval_answer_regex], "general": [e.eval_general_text, e.eval_general_tokens],
                    "max_new_tokens": flags.max_new_tokens or cfg.inference.max_new_tokens, "bf16": str(cfg.training.bf16),
                    "datasets0": str(cfg.data.datasets[0].type) if cfg.data.datasets else None, "seed": cfg.training.seed,
                    "tokenizer": cfg.model.tokenizer_config, "special_tokens": cfg.model.special_tokens}
        key = cache.row_key(cache.model_fingerprint(cfg.model.base_model), settings)
        cached = cache.load_row(key)
        if cached is not None:
            say(f"base model: the row computed earlier for these weights and settings ({cache.cache_file(key)})")
            _write_outputs(out_dir, label, cached.pop("_records", []), cached.pop("_lm_eval_samples", {}))
            return cached
    # The base row must not pick up the config's lora_model_dir: build_generator reads it when no flag is given.
    base_cfg = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"lora_model_dir": None})}) if label == "base" else cfg
    gen = build_generator(base_cfg, adapter, model, flags)
    row: dict[str, Any] = {"label": label, "source": f"{model or cfg.model.base_model}" + (f" + {adapter}" if adapter else ""),
                           "prompt_format": gen.prompts.describe, "metrics": {}, "stderr": {}, "notes": []}
    records: list[dict[str, Any]] = []
    if cfg.data.datasets and metrics:
        examples, where = held_out_examples(cfg, gen.tokenizer, gen.prompts, options.data)
        examples = examples[: options.limit] if options.limit else examples
        if not examples:  # completion text, or a preference/RL format: nothing to answer and compare
            raise LmforgeError(f"the held-out rows ({where}) hold no prompt with a trained response to compare answers with",
                               where="datasets[0].type", fix="pass --data FILE with prompt/response rows in the training format, "
                               "or set eval_metrics: [] to score only perplexity and lm-eval tasks")
        extractor = choose_extractor(e.eval_answer_extractor, e.eval_answer_regex, [x.reference for x in examples])
        say(f"{label}: {len(examples)} held-out examples from {where}; exact match reads answers with the {extractor.name} extractor")
        result = score_task(gen, examples, extractor, metrics, gen.sampling.max_new_tokens, options.batch_size, cfg.training.seed)
        row["metrics"].update(result.scores)
        row.update(examples=result.examples, data=where, extractor=extractor.name, extract_misses=result.extract_misses,
                   generated_tokens=result.generated_tokens, generation_seconds=round(result.generation_seconds, 3),
                   tokens_per_s=round(result.tokens_per_s, 2), max_new_tokens=gen.sampling.max_new_tokens,
                   batch_size=options.batch_size)
        row["notes"] += result.notes
        records = result.records
        say(f"{label}: generated {result.generated_tokens} tokens in {result.generation_seconds:.1f} s "
            f"({result.tokens_per_s:.1f} tokens/s, batches of {options.batch_size})")
        for note in result.notes:
            say(f"{label}: note: {note}")
    if e.eval_general_text:
        text = Path(e.eval_general_text).read_text(encoding="utf-8")
        tail = text[-e.eval_general_tokens * 8:]  # the file's end: enough characters for the tokens asked for
        window = min(256, e.eval_general_tokens)
        ppl, scored = text_perplexity(gen.model, gen.tokenizer, tail, window=window, max_windows=max(1, e.eval_general_tokens // window))
        row["metrics"]["general_perplexity"] = ppl
        row["general_text"] = {"file": e.eval_general_text, "tokens_scored": scored}
    samples: dict[str, Any] = {}
    if tasks:
        results = run_lm_eval(gen.model, gen.tokenizer, tasks, batch_size=e.lm_eval_batch_size, limit=limit, seed=cfg.training.seed)
        for task, values in headline(results).items():
            for metric, v in values.items():
                row["metrics"][f"{task}/{metric}"] = v["value"]
                if v["stderr"] is not None:
                    row["stderr"][f"{task}/{metric}"] = v["stderr"]
        row["lm_eval"] = {"n_samples": results.get("n-samples"), "versions": results.get("versions"),
                          "num_fewshot": {t: c.get("num_fewshot") for t, c in (results.get("configs") or {}).items()}}
        samples = results.get("samples") or {}
    del gen
    _write_outputs(out_dir, label, records, samples)
    if key is not None:
        cache.save_row(key, {**row, "_records": records, "_lm_eval_samples": samples})
    return row


def _data_identity(cfg: LmforgeConfig, data: str | None) -> Any:
    from lmforge.hashing import file_sha256

    paths = [data] if data else [s.path for s in (cfg.data.test_datasets or cfg.data.datasets or [])]
    return [(p, file_sha256(p) if Path(p).is_file() else None) for p in paths] + [cfg.data.val_set_size]


def _write_outputs(out_dir: Path, label: str, records: list[dict[str, Any]], samples: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if records:
        write_text(out_dir / f"outputs-{label}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for task, docs in samples.items():
        write_text(out_dir / f"lm_eval-{task}-{label}.jsonl",
                   "".join(json.dumps(d, ensure_ascii=False, default=str) + "\n" for d in docs))
