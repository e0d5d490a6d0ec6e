"""`lmforge train` with ``rl: grpo``: prompts → model (+ adapter) → generate, score, learn → output folder.

The same shared run as every training recipe (lmforge.recipes.run.TrainingRun: optimizer, schedule, checkpoints,
bit-identical resume, loggers, signals, publish); what differs is the data (prompts and their reward columns,
lmforge.data.prompt_sets), the stream (completions generated with the current weights, lmforge.train.rollouts)
and the objective (lmforge.train.grpo). Held-out prompts (val_set_size or test_datasets) are answered greedily
before and after training, and their mean rewards go into summary.json.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from lmforge.config import LmforgeConfig
from lmforge.data.prompt_sets import prepare_prompts
from lmforge.models.load import config_tokenizer
from lmforge.recipes.console import say
from lmforge.recipes.run import TrainingRun
from lmforge.train.grpo import GRPO
from lmforge.train.rewards import load_reward_functions
from lmforge.train.rollouts import RolloutStream, reference_model


def run_grpo(cfg: LmforgeConfig) -> dict[str, Any]:
    """Train with GRPO as configured; returns the run summary (also written to output_dir/summary.json)."""
    t, trl = cfg.training, cfg.rl.trl
    with TrainingRun(cfg, "train") as run:
        say(f"device {run.device.type}, {'bf16' if run.bf16 else 'fp32'} compute, output in {run.output_dir}")
        tokenizer = config_tokenizer(cfg, say=say)
        rewards = load_reward_functions(trl.reward_funcs or [])  # a broken reward file fails before any weights load
        prompts = prepare_prompts(cfg.data, tokenizer, t.seed, cfg.flat(), trl.chat_template_kwargs)
        say(f"prompts: {prompts.summary()}; rewards: {', '.join(r.name for r in rewards)}")
        run.predict_peak(None)
        # A generation feeds num_iterations steps: the steps of one pass over the prompts.
        plan = run.count_steps(len(prompts.train) * trl.num_generations * trl.num_iterations)
        say(f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch); each generation: "
            f"{t.micro_batch_size * t.gradient_accumulation_steps // trl.num_generations} prompts x {trl.num_generations} "
            f"completions of up to {trl.max_completion_length} tokens")

        model = run.model(tokenizer)
        # FSDP2: every forward (generation included) gathers the shards, so all ranks generate, score and evaluate together
        lockstep = run.engine.distributed and getattr(run.engine, "needs_lockstep", False)

        def autocast() -> contextlib.AbstractContextManager[Any]:
            return torch.autocast(run.device.type, run.autocast_dtype) if run.autocast_dtype else contextlib.nullcontext()

        # One process with all its weights: a prompt's prefix runs once for its group (sampling's prefill, each
        # log-probability forward). Several ranks, or sharded weights (ZeRO-3 gathers them per forward), keep one
        # forward per call (the ranks' per-step losses stay alike).
        share_prompts = not run.engine.distributed and not getattr(run.engine, "needs_lockstep", False)
        stream = RolloutStream(
            model, tokenizer, prompts.train, rewards, trl, micro_batch_size=t.micro_batch_size,
            grad_accum=t.gradient_accumulation_steps, seed=t.seed, **run.data_shard,
            reference=reference_model(model) if trl.beta else None, autocast=autocast, say=say,
            call=run.engine.call, lockstep=lockstep, share_prompts=share_prompts)
        # Skipping a micro-batch leaves its parameters without gradients, which DDP's reducer does not allow.
        objective = GRPO.from_settings(trl, skip_zero_advantage=trl.skip_zero_advantage_batches and not run.engine.distributed,
                                       share_prompts=share_prompts)
        latest: dict[str, float] = {}

        # Under several ranks each logged number is over every rank's completions, not rank 0's alone.
        sum_over_ranks = run.engine.host_sum if run.engine.distributed else None  # type: ignore[attr-defined]

        def grpo_metrics() -> dict[str, float]:
            metrics = {**stream.drain(sum_over_ranks), **objective.metrics.drain(sum_over_ranks)}
            latest.update(metrics)
            say(f"reward {metrics.get('reward', float('nan')):.3f} (std {metrics.get('reward_std', float('nan')):.3f}; "
                + ", ".join(f"{r.name} {metrics.get(f'rewards/{r.name}/mean', float('nan')):.3f}" for r in rewards)
                + f"), completion length {metrics.get('completions/mean_length', float('nan')):.0f}"
                + (f", kl {metrics['kl']:.4f}" if "kl" in metrics else "")
                + f", clipped {metrics.get('clip_ratio/region_mean', 0.0):.3f}; generation "
                f"{metrics['generation_seconds']:.1f}s, training {metrics['training_seconds']:.1f}s")
            return metrics

        held_out: dict[str, float] = {}
        eval_size = t.eval_batch_size or t.micro_batch_size * t.gradient_accumulation_steps
        if prompts.eval and (run.engine.is_main or lockstep) and run.resume_from is None:
            held_out = {f"{k}_start": v for k, v in stream.evaluate(prompts.eval, eval_size).items()}
            say(f"held-out reward at step 0: {held_out['eval_reward_start']:.3f} ({len(prompts.eval)} prompts, greedy)")
        outcome = run.train(model, tokenizer, stream, plan, objective=objective, extra_metrics=grpo_metrics,
                            invariants={"train_prompts": len(prompts.train), "num_generations": trl.num_generations,
                                        "num_iterations": trl.num_iterations})
        if prompts.eval and (run.engine.is_main or lockstep):
            end = stream.evaluate(prompts.eval, eval_size)
            held_out.update({f"{k}_end": v for k, v in end.items()})
            say(f"held-out reward after step {outcome.result.steps}: {end['eval_reward']:.3f}"
                + (f" (was {held_out['eval_reward_start']:.3f})" if "eval_reward_start" in held_out else ""))
        run.publish(model, tokenizer, outcome)
        summary = {**run.summary(outcome, model), "rl": "grpo", "train_prompts": len(prompts.train),
                   "eval_prompts": len(prompts.eval), "truncated_prompts": prompts.truncated,
                   "generation_seconds": stream.generation_seconds,
                   "training_seconds": max(outcome.wall_seconds - stream.generation_seconds, 0.0),
                   **held_out, **{f"last_{k}": v for k, v in latest.items()}}
        run.write_summary(summary, outcome)
    say(f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f}s (generation {summary['generation_seconds']:.0f}s, "
        f"training {summary['training_seconds']:.0f}s), peak memory {summary['peak_memory_mb']:.0f} MB; saved to {run.output_dir}")
    return summary
