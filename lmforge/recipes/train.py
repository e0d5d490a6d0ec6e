"""`lmforge train`: config → tokenizer → data → model (+ adapter) → loop → output folder."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import torch

from lmforge.config import LmforgeConfig
from lmforge.data.batching import eval_batches, iterate_batches
from lmforge.data.prepare import PreparedData, prepare
from lmforge.models.adapters import apply_lora, parameter_counts
from lmforge.models.load import load_model, load_tokenizer
from lmforge.train.checkpoint import atomic_dir, publish_into, save_model_files, write_json
from lmforge.train.loggers import build_loggers
from lmforge.train.loop import Callbacks, LoopSettings, evaluate, train_loop
from lmforge.train.optimizers import build_optimizer
from lmforge.train.schedules import build_scheduler, warmup_steps_for
from lmforge.train.telemetry import peak_memory_mb, pick_device, resolve_bf16


def say(message: str) -> None:
    print(f"[lmforge] {message}", flush=True)


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    eval_every: int | None
    save_every: int | None


def plan_steps(cfg: LmforgeConfig, num_examples: int) -> Plan:
    """Optimizer steps per epoch and in all, and eval/save intervals from *_per_epoch keys."""
    t = cfg.training
    micro_batches = math.ceil(num_examples / t.micro_batch_size)
    per_epoch = max(1, math.ceil(micro_batches / t.gradient_accumulation_steps))
    total = t.max_steps or max(1, math.ceil(per_epoch * t.num_epochs))
    eval_every = t.eval_steps or (max(1, per_epoch // t.evals_per_epoch) if t.evals_per_epoch else None)
    save_every = t.save_steps or (max(1, per_epoch // t.saves_per_epoch) if t.saves_per_epoch else None)
    return Plan(per_epoch, total, eval_every, save_every)


def load_for_training(cfg: LmforgeConfig, device: torch.device, bf16: bool) -> tuple[Any, Any]:
    """The tokenizer and the model, with a LoRA adapter when configured."""
    tokenizer = load_tokenizer(cfg.model.base_model, cfg.model.tokenizer_config, cfg.model.trust_remote_code)
    if cfg.model.special_tokens:
        tokenizer.add_special_tokens(dict(cfg.model.special_tokens))
    # Frozen base weights need no fp32 master copy: holding them in bf16 halves their memory
    # and skips autocast's per-step casts. Trainable weights stay fp32.
    dtype = torch.bfloat16 if (bf16 and cfg.adapter.adapter) else torch.float32
    model = load_model(cfg.model.base_model, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.adapter.adapter == "lora":
        model = apply_lora(model, cfg.adapter)
    return tokenizer, model.to(device)


def _epoch_stream(examples: list, cfg: LmforgeConfig, pad_id: int):  # noqa: ANN202
    for epoch in count():
        yield from iterate_batches(
            examples, cfg.training.micro_batch_size, pad_id, cfg.training.seed, epoch, cfg.training.group_by_length
        )


class RunCallbacks(Callbacks):
    def __init__(self, loggers: list, save: Any) -> None:
        self.loggers = loggers
        self.save = save

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def on_save(self, step: int) -> None:
        self.save(step)


def run_train(cfg: LmforgeConfig) -> dict[str, Any]:
    """Train as configured; returns the run summary (also written to output_dir/summary.json)."""
    torch.manual_seed(cfg.training.seed)
    device = pick_device()
    bf16 = resolve_bf16(cfg.training.bf16, device)
    output_dir = Path(cfg.training.output_dir)
    say(f"device {device.type}, {'bf16' if bf16 else 'fp32'} compute, output in {output_dir}")

    tokenizer, model = load_for_training(cfg, device, bf16)
    trainable, total = parameter_counts(model)
    say(f"model {cfg.model.base_model}: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})")

    data: PreparedData = prepare(cfg.data, tokenizer, cfg.training.seed)
    say(f"data: {data.stats.summary()}; {len(data.train)} train / {len(data.eval)} eval examples")
    plan = plan_steps(cfg, len(data.train))
    say(f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch)")

    t = cfg.training
    optimizer = build_optimizer(model, t.optimizer, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
    warmup = warmup_steps_for(plan.total_steps, t.warmup_steps, t.warmup_ratio)
    scheduler = build_scheduler(optimizer, t.lr_scheduler, plan.total_steps, warmup)
    settings = LoopSettings(
        total_steps=plan.total_steps,
        grad_accum=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_every=plan.eval_every if data.eval else None,
        save_every=plan.save_every,
        device=device,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    pad_id = tokenizer.pad_token_id
    eval_size = t.eval_batch_size or t.micro_batch_size
    eval_fn = (lambda: evaluate(model, eval_batches(data.eval, eval_size, pad_id), settings)) if data.eval else None
    resolved = cfg.flat()
    loggers = build_loggers(cfg.logging, str(output_dir), resolved)

    def save_checkpoint(step: int) -> None:
        atomic_dir(output_dir / f"checkpoint-{step}", lambda tmp: save_model_files(model, tokenizer, resolved, tmp))
        say(f"saved checkpoint-{step}")

    eval_start = None
    if eval_fn:
        eval_start = eval_fn()
        say(f"eval loss at step 0: {eval_start:.4f}")
        for logger in loggers:
            logger.log(0, {"eval_loss": eval_start})
    started = time.perf_counter()
    result = train_loop(
        model, optimizer, scheduler, _epoch_stream(data.train, cfg, pad_id), settings, eval_fn, RunCallbacks(loggers, save_checkpoint)
    )
    wall = time.perf_counter() - started
    eval_end = None
    if eval_fn:
        eval_end = eval_fn()
        say(f"eval loss after step {result.steps}: {eval_end:.4f}" + (f" (was {eval_start:.4f}, {1 - eval_end / eval_start:+.1%} lower)" if eval_start else ""))
        for logger in loggers:
            logger.log(result.steps, {"eval_loss": eval_end})
    for logger in loggers:
        logger.close()

    publish_into(output_dir, lambda tmp: save_model_files(model, tokenizer, resolved, tmp))
    summary = {
        "steps": result.steps,
        "real_tokens": result.real_tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s,
        "warmup_steps_excluded": settings.timing_warmup_steps,
        "wall_seconds": wall,
        "total_tokens": result.total_tokens,
        "final_train_loss": result.train_history[-1][1] if result.train_history else None,
        "eval_loss_start": eval_start,
        "eval_loss_end": eval_end,
        "eval_history": result.eval_history,
        "peak_memory_mb": peak_memory_mb(device),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "truncated_rows": data.stats.truncated,
        "skipped_rows_no_response": data.stats.no_trainable_tokens,
    }
    write_json(output_dir / "summary.json", summary)
    say(f"done: {result.steps} steps in {wall:.0f}s, {result.tokens_per_s:.0f} tokens/s, peak memory {summary['peak_memory_mb']:.0f} MB; saved to {output_dir}")
    return summary
