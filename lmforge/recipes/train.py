"""`lmforge train`: config → tokenizer → data → model (+ adapter) → loop → output folder."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lmforge.config import LmforgeConfig
from lmforge.recipes.console import say
from lmforge.data.batching import eval_batches, packing_efficiency
from lmforge.data.prepare import PreparedData, prepare
from lmforge.errors import LmforgeError
from lmforge.models.adapters import parameter_counts
from lmforge.train.checkpoint import (
    assert_finite,
    list_checkpoints,
    load_best,
    load_checkpoint,
    prune_checkpoints,
    publish_into,
    remove_partial_writes,
    resolve_resume,
    save_checkpoint,
    save_model_files,
    trainable_state,
    write_json,
)
from lmforge.train.loggers import build_loggers
from lmforge.train.loop import Callbacks, LoopResult, LoopSettings, NonFiniteError, evaluate, train_loop
from lmforge.train.loss import causal_lm_loss
from lmforge.train.optimizers import build_optimizer
from lmforge.models.setup import load_training_model, load_training_tokenizer
from lmforge.train.report import plot_losses, summary_markdown
from lmforge.train.schedules import build_scheduler, warmup_steps_for
from lmforge.train.signals import stop_on_signals
from lmforge.train.stream import EpochStream
from lmforge.train.telemetry import peak_memory_mb, pick_device, release_free_memory, resolve_bf16

# A checkpoint's data position means the same batches only under the same settings.
RESUME_INVARIANTS = ("seed", "micro_batch_size", "gradient_accumulation_steps", "group_by_length", "sequence_len", "sample_packing")


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
    """The tokenizer and the model, with its adapter when configured."""
    tokenizer = load_training_tokenizer(cfg, say)
    model = load_training_model(cfg, tokenizer, device, bf16, say)
    if cfg.training.dropout is not None:
        say(f"dropout {cfg.training.dropout} set on the model's dropout fields")
    return tokenizer, model


class RunCallbacks(Callbacks):
    def __init__(self, loggers: list, save: Any, on_best: Any = None) -> None:
        self.loggers = loggers
        self.save = save
        self.best = on_best

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def on_save(self, step: int) -> None:
        self.save(step)

    def on_best(self, step: int, eval_loss: float) -> None:
        if self.best:
            self.best(step, eval_loss)


def _check_resumable(state: dict[str, Any], cfg: LmforgeConfig, folder: Path, train_examples: int) -> None:
    saved, now = state.get("settings", {}), _invariants(cfg, train_examples)
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if changed:
        details = ", ".join(f"{k}: {saved[k]} → {now[k]}" for k in changed)
        raise LmforgeError(f"cannot resume from {folder.name}: the data order depends on settings that changed ({details})",
                           where=str(folder), fix="restore those settings, or start a new run in a new output_dir")


def _invariants(cfg: LmforgeConfig, train_examples: int) -> dict[str, Any]:
    flat = cfg.flat()
    return {**{k: flat.get(k) for k in RESUME_INVARIANTS}, "train_examples": train_examples}


def run_train(cfg: LmforgeConfig) -> dict[str, Any]:
    """Train as configured; returns the run summary (also written to output_dir/summary.json)."""
    t = cfg.training
    torch.manual_seed(t.seed)
    device = pick_device()
    bf16 = resolve_bf16(t.bf16, device)
    output_dir = Path(t.output_dir)
    say(f"device {device.type}, {'bf16' if bf16 else 'fp32'} compute, output in {output_dir}")
    resume_from = resolve_resume("auto" if t.auto_resume_from_checkpoints and not t.resume_from_checkpoint else t.resume_from_checkpoint, output_dir, say)

    tokenizer, model = load_for_training(cfg, device, bf16)
    trainable, total = parameter_counts(model)
    say(f"model {cfg.model.base_model}: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})")

    data: PreparedData = prepare(cfg.data, tokenizer, t.seed)
    release_free_memory()
    say(f"data: {data.stats.summary()}; {len(data.train)} train / {len(data.eval)} eval examples")
    packing = cfg.data.sample_packing
    rows = len(data.train)
    if packing:
        efficiency, rows = packing_efficiency([len(e) for e in data.train], cfg.data.sequence_len, t.seed)
        say(f"sample packing: {len(data.train)} examples in {rows} rows of {cfg.data.sequence_len} tokens, {efficiency:.1%} filled")
    plan = plan_steps(cfg, rows)
    say(f"{plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch)")
    if (t.early_stopping_patience or t.load_best_model_at_end) and not data.eval:
        key = "early_stopping_patience" if t.early_stopping_patience else "load_best_model_at_end"
        raise LmforgeError(f"{key} needs an eval split", where=key, fix="set val_set_size")

    optimizer = build_optimizer(model, t.optimizer, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2),
                                t.adam_epsilon, t.sgd_momentum, t.sgd_nesterov)
    warmup = warmup_steps_for(plan.total_steps, t.warmup_steps, t.warmup_ratio)
    scheduler = build_scheduler(optimizer, t.lr_scheduler, plan.total_steps, warmup, t.cosine_min_lr_ratio or 0.0)
    settings = LoopSettings(
        total_steps=plan.total_steps,
        grad_accum=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_every=plan.eval_every if data.eval else None,
        save_every=plan.save_every,
        early_stopping_patience=t.early_stopping_patience,
        nan_policy=t.nan_policy,
        device=device,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    pad_id = tokenizer.pad_token_id
    eval_size = t.eval_batch_size or t.micro_batch_size
    eval_packing = packing if getattr(cfg.data, "eval_sample_packing", None) is None else cfg.data.eval_sample_packing
    eval_len = cfg.data.sequence_len if eval_packing else None
    eval_fn = (lambda: evaluate(model, eval_batches(data.eval, eval_size, pad_id, eval_len), settings)) if data.eval else None
    train_loss = partial(causal_lm_loss, label_smoothing=t.label_smoothing_factor) if t.label_smoothing_factor else causal_lm_loss
    stream = EpochStream(data.train, t.micro_batch_size, pad_id, t.seed, t.group_by_length,
                         sequence_len=cfg.data.sequence_len if packing else None)
    resolved = cfg.flat()

    result, eval_start, best = LoopResult(), None, None
    if resume_from:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        _check_resumable(state, cfg, resume_from, len(data.train))
        result, eval_start = LoopResult.from_dict(state["loop"]), state.get("eval_loss_start")
        stream.epoch, stream.consumed = state["data_position"]["epoch"], state["data_position"]["batches_consumed"]
        if t.load_best_model_at_end:
            best = load_best(resume_from) or (trainable_state(model) if result.best_step == result.steps else None)
        say(f"resumed from {resume_from} at step {result.steps} (epoch {stream.epoch}, batch {stream.consumed})")
    remove_partial_writes(output_dir)

    def trainer_state() -> dict[str, Any]:
        return {"loop": result.to_dict(), "data_position": stream.position(), "eval_loss_start": eval_start,
                "settings": _invariants(cfg, len(data.train))}

    def save(step: int) -> None:
        assert_finite(model, step)
        save_checkpoint(output_dir / f"checkpoint-{step}", model=model, tokenizer=tokenizer, config=resolved,
                        optimizer=optimizer, scheduler=scheduler, state=trainer_state(),
                        best=best if result.best_step != step else None)  # else the saved weights are the best
        removed = prune_checkpoints(output_dir, t.save_total_limit) if t.save_total_limit else []
        say(f"saved checkpoint-{step}" + (f" (removed {', '.join(p.name for p in removed)})" if removed else ""))

    def remember_best(step: int, eval_loss: float) -> None:
        nonlocal best
        if t.load_best_model_at_end:
            best = trainable_state(model)

    loggers = build_loggers(cfg.logging, str(output_dir), resolved)
    callbacks = RunCallbacks(loggers, save, remember_best)
    started = time.perf_counter()
    try:
        if eval_fn and eval_start is None:
            eval_start = eval_fn()
            say(f"eval loss at step 0: {eval_start:.4f}")
            callbacks.on_log(0, {"eval_loss": eval_start, "eval_perplexity": math.exp(min(eval_start, 50))})
        with stop_on_signals(callbacks):
            result = train_loop(model, optimizer, scheduler, iter(stream), settings, eval_fn, callbacks, train_loss, result=result)
    except NonFiniteError as exc:
        good = next(iter(list_checkpoints(output_dir)), None)
        raise LmforgeError(
            f"{exc.message}; stopped without saving", where="training",
            fix=(f"last good checkpoint: {good}; " if good else "no checkpoint was saved; ")
            + "lower learning_rate, set max_grad_norm, or set nan_policy: skip",
        ) from exc
    finally:
        for logger in loggers:
            logger.close()
    wall = time.perf_counter() - started
    if result.stop_reason == "interrupted":
        save(result.steps)
        say(f"stopped at step {result.steps}; resume with --resume_from_checkpoint=auto")
        raise KeyboardInterrupt

    last_eval = result.eval_history[-1][1] if result.eval_history else None
    eval_end = last_eval
    if t.load_best_model_at_end and best is not None and result.best_step != result.steps:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in best:
                    param.copy_(best[name])
        eval_end = result.best_eval_loss
        say(f"restored the best weights: step {result.best_step}, eval loss {result.best_eval_loss:.4f}")
    if eval_end is not None:
        say(f"eval loss after step {result.steps}: {eval_end:.4f}" + (f" (was {eval_start:.4f}, {1 - eval_end / eval_start:.1%} lower)" if eval_start else ""))

    assert_finite(model, result.steps)
    publish_into(output_dir, lambda tmp: save_model_files(model, tokenizer, resolved, tmp))
    best_checkpoint = output_dir / f"checkpoint-{result.best_step}"
    summary = {
        "steps": result.steps,
        "stop_reason": result.stop_reason,
        "real_tokens": result.real_tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s,
        "warmup_steps_excluded": settings.timing_warmup_steps,
        "wall_seconds": wall,
        "total_tokens": result.total_tokens,
        "final_train_loss": result.train_history[-1][1] if result.train_history else None,
        "eval_loss_start": eval_start,
        "eval_loss_end": eval_end,
        "last_eval_loss": last_eval,
        "best_eval_loss": result.best_eval_loss,
        "best_step": result.best_step,
        "best_checkpoint": str(best_checkpoint) if best_checkpoint.is_dir() else (
            str(output_dir) if (t.load_best_model_at_end or result.best_step == result.steps) and result.best_step else None),
        "eval_history": result.eval_history,
        "skipped_steps": result.skipped_steps,
        "peak_memory_mb": peak_memory_mb(device),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "truncated_rows": data.stats.truncated,
        "skipped_rows_no_response": data.stats.no_trainable_tokens,
        "resumed_from": str(resume_from) if resume_from else None,
    }
    write_json(output_dir / "summary.json", summary)
    plot_losses(output_dir / "loss_curves.png", result.train_history, ([(0, eval_start)] if eval_start is not None else []) + result.eval_history)
    (output_dir / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    say(f"done: {result.steps} steps in {wall:.0f}s, {result.tokens_per_s:.0f} tokens/s, peak memory {summary['peak_memory_mb']:.0f} MB; saved to {output_dir}")
    return summary
