"""`lmforge train`: config → tokenizer → data → model (+ adapter) → loop → output folder.

The data is prepared before any weights load, so a broken row, a missing column or a
sequence_len too short for every example fails in well under a second. Everything a training
run shares with `pretrain` (model, optimizer, schedule, checkpoints, resume, loggers, signals,
final save) comes from :class:`lmforge.recipes.run.TrainingRun`.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import LmforgeConfig
from lmforge.data.batching import eval_batches, packing_efficiency, pad_batch
from lmforge.data.prepare import prepare
from lmforge.models.load import config_processor, config_tokenizer
from lmforge.recipes.console import say
from lmforge.recipes.run import TrainingRun
from lmforge.train.stream import EpochStream
from lmforge.device import release_free_memory


def run_train(cfg: LmforgeConfig) -> dict[str, Any]:
    """Train as configured; returns the run summary (also written to output_dir/summary.json)."""
    t, d = cfg.training, cfg.data
    with TrainingRun(cfg, "train") as run:
        say(f"device {run.device.type}, {'bf16' if run.bf16 else 'fp32'} compute, output in {run.output_dir}")
        tokenizer = config_tokenizer(cfg, say=say)
        # an image-text model's processor turns images into its pixel inputs; it holds this same tokenizer, and is
        # what checkpoints and the output save (tokenizer, image processor, chat template), so inference finds it
        processor = config_processor(cfg, tokenizer) if cfg.model.processor_type else None
        with run.main_first():  # under several ranks rank 0 prepares and caches the data; the others read the cache
            # ... in the run's own output folder unless dataset_prepared_path names a place (not the current folder)
            shared = run.output_dir / "prepared_data" if run.engine.distributed else None
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
                             sequence_len=d.sequence_len if d.sample_packing else None, pad_to=pad_to, **run.data_shard)
        eval_packing = d.sample_packing if d.eval_sample_packing is None else d.eval_sample_packing
        eval_size, eval_len = t.eval_batch_size or t.micro_batch_size, d.sequence_len if eval_packing else None
        objective = run.objective()  # label smoothing and the output-head choice come with it

        def eval_fn() -> float:
            batches = eval_batches(data.eval, eval_size, pad_id, eval_len)
            return run.evaluate(model, (pad_batch(b, pad_to, pad_id) for b in batches) if pad_to else batches, objective)

        outcome = run.train(model, processor or tokenizer, stream, plan, objective=objective, eval_fn=eval_fn if data.eval else None,
                            invariants={"train_examples": len(data.train)})

        start, end = outcome.eval_start, outcome.eval_end
        if end is not None:
            say(f"eval loss after step {outcome.result.steps}: {end:.4f}"
                + (f" (was {start:.4f}, {1 - end / start:.1%} lower)" if start else ""))
        run.publish(model, processor or tokenizer, outcome)
        summary = {**run.summary(outcome, model), "truncated_rows": data.stats.truncated,
                   "skipped_rows_no_response": data.stats.no_trainable_tokens}
        run.write_summary(summary, outcome)
    say(f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f}s, {summary['tokens_per_s']:.0f} tokens/s, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB; saved to {run.output_dir}")
    return summary
