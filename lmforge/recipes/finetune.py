"""`lmforge train`: config → tokenizer → data → model (+ adapter) → loop → output folder.

The data is prepared before any weights load, so a broken row, a missing column or a
sequence_len too short for every example fails in well under a second. Everything a training
run shares with `pretrain` (model, optimizer, schedule, checkpoints, resume, loggers, signals,
final save) comes from :class:`lmforge.recipes.run.TrainingRun`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.config import LmforgeConfig
from lmforge.data.batching import eval_batches, packing_efficiency, pad_batch
from lmforge.data.batching import Batch
from lmforge.data.cache import DEFAULT_PREPARED_PATH
from lmforge.data.prepare import prepare
from lmforge.data.preference import (collate_examples, load_reference_logps, prepare_preferences, reference_store_path,
                                     save_reference_logps)
from lmforge.train.preference import precompute_reference
from lmforge.models.load import config_processor, config_tokenizer
from lmforge.recipes.console import say
from lmforge.recipes.run import TrainingRun
from lmforge.train.stream import EpochStream
from lmforge.device import release_free_memory


@torch.no_grad()
def _score(model: Any, batches: list[Batch], objective: Any, device: torch.device) -> tuple[float, int, dict[str, float]]:
    loss_total, count, sums = 0.0, 0, {}
    for batch in batches:
        loss_sum, n, metrics = objective(model, {k: v.to(device) for k, v in batch.items()})
        loss_total, count = loss_total + float(loss_sum), count + n
        for name, value in metrics.items():  # per-batch means, weighted by the batch's pairs
            sums[name] = sums.get(name, 0.0) + float(value) * n
    return loss_total, count, sums


def preference_eval(run: TrainingRun, model: Any, objective: Any, examples: list[Any], batch_size: int,
                    pad_id: int) -> tuple[float, dict[str, float]]:
    """Held-out mean loss of a preference objective and its metrics (rewards/accuracies, margins), in a fixed order."""
    batches = [collate_examples(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]
    was_training = model.training
    model.eval()
    try:
        loss_total, count, sums = run.call(model, _score, batches, objective, run.device)
    finally:
        model.train(was_training)
    return loss_total / max(count, 1), {name: value / max(count, 1) for name, value in sums.items()}


def _precomputed_reference(cfg: LmforgeConfig, run: TrainingRun, model: Any, pairs: list[Any], batch_size: int) -> None:
    """precompute_ref_log_probs: every pair's reference log-probabilities, read from the prepared-data folder when a
    run on the same pairs and reference (a resume, or a second run) stored them, else computed once and stored.

    The store's key holds what the numbers depend on (the pairs' token ids, the base weights' files, quantization,
    compute dtype, batch size), so a changed base model or precision computes them again."""
    d = cfg.data
    root = None if d.skip_prepare_dataset else (
        d.dataset_prepared_path or (run.output_dir / "prepared_data" if run.engine.distributed else DEFAULT_PREPARED_PATH))
    path = reference_store_path(root, pairs, _reference_identity(cfg, run, batch_size)) if root is not None else None
    # one decision for every rank (rank 0 looks): all of them read, or all of them compute (a sharded forward is collective)
    found = run.engine.broadcast(bool(path and load_reference_logps(path, pairs)) if run.engine.is_main else None)
    if found and (run.engine.is_main or load_reference_logps(path, pairs)):  # type: ignore[arg-type]
        say(f"precompute_ref_log_probs: reference log-probabilities of {len(pairs)} pairs read from {path}")
        return
    say(f"precompute_ref_log_probs: reference log-probabilities of {len(pairs)} pairs")
    run.call(model, precompute_reference, pairs, collate_examples, batch_size, run.device)
    if path is not None and run.engine.is_main:
        save_reference_logps(path, pairs)
        say(f"precompute_ref_log_probs: stored in {path}")


def _reference_identity(cfg: LmforgeConfig, run: TrainingRun, batch_size: int) -> dict[str, Any]:
    """What the reference log-probabilities depend on besides the pairs: the base weights (their files' names, sizes
    and times, for a local folder), how they are loaded and computed."""
    base = Path(cfg.model.base_model or "")
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in base.glob("*")
                   if f.suffix in (".safetensors", ".bin", ".gguf", ".json")) if base.is_dir() else []
    return {"model": cfg.model.model_dump(mode="json"), "weights": files, "seed": cfg.training.seed,
            "quantization": cfg.quantization.model_dump(mode="json"), "autocast": str(run.autocast_dtype),
            "device": run.device.type, "batch_size": batch_size}


def run_train(cfg: LmforgeConfig) -> dict[str, Any]:
    """Train as configured; returns the run summary (also written to output_dir/summary.json)."""
    if cfg.rl.rl == "grpo":  # prompts and generated completions instead of examples: the same run, another stream
        from lmforge.recipes.grpo import run_grpo

        return run_grpo(cfg)
    t, d, e = cfg.training, cfg.data, cfg.evaluation
    if e.lm_eval_tasks:  # an unknown task or a Hub task offline is refused now, not after the training
        from lmforge.eval.harness import check_tasks

        check_tasks(e.lm_eval_tasks, where="lm_eval_tasks")
    with TrainingRun(cfg, "train") as run:
        say(f"device {run.device.type}, {'bf16' if run.bf16 else 'fp32'} compute, output in {run.output_dir}")
        tokenizer = config_tokenizer(cfg, say=say)
        # preference tuning (or a reward model): pairs (or KTO rows) instead of examples, the same run otherwise
        rl = cfg.rl.rl or ("reward_model" if cfg.rl.reward_model else None)
        # an image-text model's processor turns images into its pixel inputs; it holds this same tokenizer, and is
        # what checkpoints and the output save (tokenizer, image processor, chat template), so inference finds it
        processor = config_processor(cfg, tokenizer) if cfg.model.processor_type else None
        with run.main_first():  # under several ranks rank 0 prepares and caches the data; the others read the cache
            # ... in the run's own output folder unless dataset_prepared_path names a place (not the current folder)
            shared = run.output_dir / "prepared_data" if run.engine.distributed else None
            if rl:
                data = prepare_preferences(d, tokenizer, t.seed, kto=rl == "kto", max_prompt_len=cfg.rl.max_prompt_len)
            else:
                data = prepare(d, tokenizer, t.seed, save=True if run.engine.distributed else None, default_root=shared,
                               processor=processor)
        say(f"data: {data.stats.summary()}; {len(data.train)} train / {len(data.eval)} eval examples")
        run.predict_peak(data)
        rows = len(data.train)
        if d.sample_packing:
            efficiency, rows = packing_efficiency([len(e) for e in data.train], d.sequence_len, t.seed)
            say(f"sample packing: {len(data.train)} examples in {rows} rows of {d.sequence_len} tokens, {efficiency:.1%} filled")
        plan = run.count_steps(rows)
        say(f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch)")

        model = run.model(tokenizer)
        release_free_memory()
        pad_id = tokenizer.pad_token_id
        pad_to = d.sequence_len if d.pad_to_sequence_len else None
        stream = EpochStream(data.train, t.micro_batch_size, pad_id, t.seed, t.group_by_length,
                             sequence_len=d.sequence_len if d.sample_packing else None, pad_to=pad_to, **run.data_shard,
                             collate_fn=collate_examples if rl else None)
        eval_packing = d.sample_packing if d.eval_sample_packing is None else d.eval_sample_packing
        eval_size, eval_len = t.eval_batch_size or t.micro_batch_size, d.sequence_len if eval_packing else None
        objective = run.objective()  # label smoothing and the output-head choice come with it
        eval_metrics: list[dict[str, float]] = []  # preference runs: held-out rewards/accuracies per evaluation

        def eval_fn() -> float:
            if rl:
                loss, metrics = preference_eval(run, model, objective, data.eval, eval_size, pad_id)
                eval_metrics.append(metrics)
                say("held-out " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                return loss
            batches = eval_batches(data.eval, eval_size, pad_id, eval_len)
            return run.evaluate(model, (pad_batch(b, pad_to, pad_id) for b in batches) if pad_to else batches, objective)

        if rl and objective.needs_reference_model:
            if cfg.rl.precompute_ref_log_probs:  # once, before any update: no reference model while training
                _precomputed_reference(cfg, run, model, data.train + data.eval, eval_size)
            objective = run.with_reference(objective, model)

        outcome = run.train(model, processor or tokenizer, stream, plan, objective=objective, eval_fn=eval_fn if data.eval else None,
                            invariants={"train_examples": len(data.train)},
                            generation_eval=_generation_eval(cfg, run, model, tokenizer, data.eval))

        start, end = outcome.eval_start, outcome.eval_end
        if end is not None:
            say(f"eval loss after step {outcome.result.steps}: {end:.4f}"
                + (f" (was {start:.4f}, {1 - end / start:.1%} lower)" if start else ""))
        run.publish(model, processor or tokenizer, outcome)
        summary = {**run.summary(outcome, model), "truncated_rows": data.stats.truncated,
                   "skipped_rows_no_response": data.stats.no_trainable_tokens}
        if e.lm_eval_tasks and run.engine.is_main:
            summary["lm_eval"] = _lm_eval_after_training(cfg, run, model, tokenizer, outcome.result.steps)
        if rl:
            summary.update(rl=rl, skipped_identical_pairs=data.stats.identical_skipped,
                           skipped_prompt_fills_sequence_len=data.stats.too_long_skipped,
                           eval_metrics_start=eval_metrics[0] if eval_metrics else None,
                           eval_metrics_end=eval_metrics[-1] if eval_metrics else None)
        run.write_summary(summary, outcome)
    say(f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f}s, {summary['tokens_per_s']:.0f} tokens/s, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB; saved to {run.output_dir}")
    return summary


def _generation_eval(cfg: LmforgeConfig, run: TrainingRun, model: Any, tokenizer: Any, eval_examples: list) -> Any:
    """do_causal_lm_eval: the function that scores generations at each eval step (None when off)."""
    e = cfg.evaluation
    if not e.do_causal_lm_eval:
        return None
    if run.engine.distributed:
        say("note: do_causal_lm_eval runs in one process only; this run has several ranks, so it is skipped")
        return None
    from lmforge.eval.during import causal_lm_metrics, eval_rows
    from lmforge.eval.metrics import metric_names
    from lmforge.infer.prompts import PromptBuilder

    metrics = metric_names(e.eval_causal_lm_metrics, "eval_causal_lm_metrics")
    rows = eval_rows(eval_examples, e.eval_causal_lm_examples)
    prompts = PromptBuilder.from_config(cfg, tokenizer, model)
    batch = cfg.training.eval_batch_size or cfg.training.micro_batch_size
    say(f"do_causal_lm_eval: {', '.join(metrics)} of greedy answers to {len(rows)} eval rows "
        f"(up to {e.eval_max_new_tokens} tokens each) at each eval")
    return lambda: causal_lm_metrics(model, tokenizer, prompts, rows, metrics, e.eval_max_new_tokens, batch,
                                     e.eval_answer_extractor, e.eval_answer_regex)


def _lm_eval_after_training(cfg: LmforgeConfig, run: TrainingRun, model: Any, tokenizer: Any, step: int) -> dict[str, Any]:
    """lm_eval_tasks on the trained model, into summary.json and the trackers (lm_eval/<task>/<metric>)."""
    from lmforge.eval.harness import headline, run_lm_eval

    e = cfg.evaluation
    say(f"lm-eval: {', '.join(e.lm_eval_tasks)} on the trained model")
    was_training = model.training
    results = run.call(model, lambda m: run_lm_eval(m, tokenizer, e.lm_eval_tasks, batch_size=e.lm_eval_batch_size,
                                                    limit=e.lm_eval_limit, seed=cfg.training.seed))
    model.train(was_training)
    scores = headline(results)
    flat = {f"lm_eval/{task}/{metric}": v["value"] for task, values in scores.items() for metric, v in values.items()}
    for name, value in flat.items():
        say(f"{name}: {value:.4f}")
    run.log(step, flat)
    return scores
