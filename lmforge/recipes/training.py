"""The training setup every training recipe shares (`train`, `pretrain`), so every loop feature works in both.

A recipe reads top to bottom (torchtune's shape: setup → train → save) and gets each shared
part from one :class:`TrainingRun`::

    with TrainingRun(cfg, "train") as run:       # seed, device, precision, output_dir lock, resume point
        tokenizer = run.tokenizer()               # the one tokenizer loader (models.load.tokenizer_for)
        ...                                       # the recipe's own data, prepared before any weights load
        plan = run.plan(rows)                     # steps, warm-up (warned when it eats the run), eval/save cadence
        model = run.model(tokenizer)              # base (or new) weights, quantization, adapter, dropout, freezing
        outcome = run.train(model, tokenizer, stream, plan, loss_fn=..., eval_fn=..., invariants=...)
        run.publish(model, tokenizer, outcome)    # weights or adapter, tokenizer, config.yml
        run.write_summary({**run.summary(outcome, model), ...}, outcome)   # summary.json, summary.md, loss plot

`train` holds the parts a training run must get right once: optimizer and schedule, resume
(weights, optimizer, scheduler, RNG states, data position), periodic checkpoints with
``save_total_limit``, early stopping and the best weights, loggers, SIGTERM/SIGINT (save, then
exit 130; a second signal exits at once), and a checkpoint of the final state, so a finished run
can be extended with a larger ``max_steps`` and ``--resume_from_checkpoint=auto``.

Config keys are read here, once, and nowhere else in the training path: a new training key
belongs in the part that it changes, and then works in every training recipe at once:
- how the model is built or run (attn_implementation, torch_compile, liger kernels): `model`;
- what one step does (loss_watchdog_*, fp16 with a grad scaler): `loop_settings` / the loop;
- when and what to save (save_strategy, save_only_model): `plan_steps` and `train`'s `save`;
- optimizer and schedule keys: `optimizer`; loggers (use_tensorboard, trackers): `train`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import publish_into, write_json
from lmforge.config import LmforgeConfig
from lmforge.config.checks import warmup_warning
from lmforge.config.sections import TrainingSection
from lmforge.data.batching import Batch
from lmforge.errors import LmforgeError
from lmforge.models.adapters import parameter_counts
from lmforge.recipes.console import say
from lmforge.train.checkpoint import (
    assert_finite,
    list_checkpoints,
    load_best,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_writes,
    resolve_resume,
    save_checkpoint,
    save_model_files,
    trainable_state,
)
from lmforge.train.loggers import build_loggers
from lmforge.train.loop import Callbacks, LoopResult, LoopSettings, LossFn, NonFiniteError, evaluate, train_loop
from lmforge.train.optimizers import build_optimizer
from lmforge.redact import redact
from lmforge.train.report import plot_losses, summary_markdown
from lmforge.train.runlock import RunLock
from lmforge.train.schedules import build_scheduler, warmup_steps_for
from lmforge.train.signals import sigterm_as_interrupt, stop_on_signals
from lmforge.train.stream import ResumableStream
from lmforge.train.telemetry import peak_memory_mb, pick_device, resolve_bf16


@dataclass
class StepPlan:
    """How long the run is and how often it evaluates and saves, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int | None
    save_every: int | None


def plan_steps(t: TrainingSection, rows: int) -> StepPlan:
    """Optimizer steps per epoch and in all for `rows` training rows (examples, packed rows or
    token windows), warm-up, and eval/save intervals from the *_per_epoch keys."""
    micro_batches = math.ceil(rows / t.micro_batch_size)
    per_epoch = max(1, math.ceil(micro_batches / t.gradient_accumulation_steps))
    total = t.max_steps or max(1, math.ceil(per_epoch * t.num_epochs))
    eval_every = t.eval_steps or (max(1, per_epoch // t.evals_per_epoch) if t.evals_per_epoch else None)
    save_every = t.save_steps or (max(1, per_epoch // t.saves_per_epoch) if t.saves_per_epoch else None)
    return StepPlan(per_epoch, total, warmup_steps_for(total, t.warmup_steps, t.warmup_ratio), eval_every, save_every)


@dataclass
class TrainOutcome:
    """What `TrainingRun.train` hands back to the recipe."""

    result: LoopResult
    eval_start: float | None  # eval loss before the first step (None without an eval set)
    eval_end: float | None  # eval loss of the weights the run ends with (the best, with load_best_model_at_end)
    wall_seconds: float
    settings: LoopSettings


class _RunCallbacks(Callbacks):
    def __init__(self, loggers: list, save: Callable[[int], None], on_best: Callable[[int, float], None]) -> None:
        self.loggers, self.save, self.best = loggers, save, on_best

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def on_save(self, step: int) -> None:
        self.save(step)

    def on_best(self, step: int, eval_loss: float) -> None:
        self.best(step, eval_loss)


def check_resumable(state: dict[str, Any], invariants: dict[str, Any], folder: Path) -> None:
    """Refuse a checkpoint whose data position means other batches under today's settings."""
    saved = state.get("settings", {})
    changed = [k for k in invariants if k in saved and saved[k] != invariants[k]]
    if changed:
        details = ", ".join(f"{k}: {saved[k]} → {invariants[k]}" for k in changed)
        raise LmforgeError(f"cannot resume from {folder.name}: the data order depends on settings that changed ({details})",
                           where=str(folder), fix="restore those settings, or start a new run in a new output_dir")


def data_tokenizer(cfg: LmforgeConfig, source: str | None = None) -> Any:
    """The tokenizer every command prepares a config's data with (train, pretrain, preprocess, data report).

    models.load.tokenizer_for loads it with the config's special_tokens; a named chat template's marker
    tokens (chatml's <|im_start|>, ...) then join it, and a configured template becomes its own, so the
    data is tokenized, the embeddings grow and the output is saved with one and the same tokenizer.
    """
    from lmforge.data.formats.templates import prepare_chat_tokenizer
    from lmforge.models.load import tokenizer_for

    tokenizer = tokenizer_for(cfg, source)
    added = prepare_chat_tokenizer(tokenizer, cfg.data)
    if added:
        say(f"chat_template: added {', '.join(added)} to the tokenizer as special tokens (the embeddings grow to match)")
    return tokenizer


class TrainingRun:
    """One training run's shared parts; see the module docstring for the order a recipe uses them in."""

    def __init__(self, cfg: LmforgeConfig, command: str = "train") -> None:
        self.cfg = cfg
        self.t = cfg.training
        self.command = command
        self.device = pick_device()
        self.bf16 = resolve_bf16(self.t.bf16, self.device)
        self.autocast_dtype = torch.bfloat16 if self.bf16 else None
        self.output_dir = Path(self.t.output_dir)
        self.resolved = redact(cfg.flat())  # saved beside every checkpoint and output (and sent to trackers): no secrets
        self.lock = RunLock(self.output_dir, command, say)
        self.resume_from: Path | None = None

    # -- setup ---------------------------------------------------------------------------------------

    def __enter__(self) -> "TrainingRun":
        for warning in self.cfg.warnings:
            say(f"warning: {warning}")
        torch.manual_seed(self.t.seed)
        self._sigterm = sigterm_as_interrupt()
        self._sigterm.__enter__()
        try:
            self.lock.acquire()
            t = self.t
            setting = "auto" if t.auto_resume_from_checkpoints and not t.resume_from_checkpoint else t.resume_from_checkpoint
            self.resume_from = resolve_resume(setting, self.output_dir, say)
            earlier = list_checkpoints(self.output_dir)
            if earlier and not self.resume_from:
                say(f"note: {self.output_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in earlier[:3])}); "
                    "this run starts at step 0 and replaces those it reaches (to continue instead: --resume_from_checkpoint=auto)")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        self._sigterm.__exit__(None, None, None)

    def tokenizer(self, source: str | None = None) -> Any:
        """The config's tokenizer (`source`: a folder holding a trained one), chat-template tokens added."""
        return data_tokenizer(self.cfg, source)

    def plan(self, rows: int) -> StepPlan:
        plan = plan_steps(self.t, rows)
        # With max_steps set, the config checks already warned (validate says it too).
        if self.t.max_steps is None and (line := warmup_warning(self.t, plan.warmup_steps, plan.total_steps)):
            say(f"warning: {line}")
        return plan

    def model(self, tokenizer: Any, new_model: Any = None) -> Any:
        """The model to train: `new_model` (built from scratch) or the config's base model, with
        quantization, adapter, dropout, frozen weights and gradient checkpointing as configured."""
        from lmforge.models.setup import training_model

        model = training_model(self.cfg, tokenizer, self.device, self.bf16, new_model=new_model, say=say)
        trainable, total = parameter_counts(model)
        source = f"new {model.config.model_type}" if new_model is not None else self.cfg.model.base_model
        say(f"model {source}: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})"
            + (f"; dropout {self.t.dropout}" if self.t.dropout is not None else ""))
        return model

    def evaluate(self, model: Any, batches: Iterable[Batch], loss_fn: LossFn) -> float:
        """Mean per-token loss, with the run's device and precision."""
        return evaluate(model, iter(batches), self.loop_settings(StepPlan(1, 0, 0, None, None)), loss_fn)

    def loop_settings(self, plan: StepPlan, has_eval: bool = False) -> LoopSettings:
        t = self.t
        return LoopSettings(
            total_steps=plan.total_steps,
            grad_accum=t.gradient_accumulation_steps,
            max_grad_norm=t.max_grad_norm,
            logging_steps=t.logging_steps,
            eval_every=plan.eval_every if has_eval else None,
            save_every=plan.save_every,
            early_stopping_patience=t.early_stopping_patience if has_eval else None,
            nan_policy=t.nan_policy,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )

    def optimizer(self, model: Any, plan: StepPlan) -> tuple[torch.optim.Optimizer, Any]:
        t = self.t
        optimizer = build_optimizer(model, t.optimizer, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2),
                                    t.adam_epsilon, t.sgd_momentum, t.sgd_nesterov)
        scheduler = build_scheduler(optimizer, t.lr_scheduler, plan.total_steps, plan.warmup_steps, t.cosine_min_lr_ratio or 0.0)
        return optimizer, scheduler

    # -- train ---------------------------------------------------------------------------------------

    def train(
        self,
        model: Any,
        tokenizer: Any,
        stream: ResumableStream,
        plan: StepPlan,
        *,
        loss_fn: LossFn,
        eval_fn: Callable[[], float] | None = None,
        invariants: dict[str, Any],
    ) -> TrainOutcome:
        """Train to plan.total_steps (or early stopping), resuming when asked, checkpointing as configured.

        `invariants` are the settings the data position depends on; a resume refuses a checkpoint
        saved under others. On SIGTERM/SIGINT: a checkpoint, then KeyboardInterrupt (exit 130).
        """
        t, output_dir = self.t, self.output_dir
        optimizer, scheduler = self.optimizer(model, plan)
        settings = self.loop_settings(plan, has_eval=eval_fn is not None)
        result, eval_start, best = LoopResult(), None, None
        resumed_at = None
        if self.resume_from:
            state = load_checkpoint(self.resume_from, model, optimizer, scheduler)
            check_resumable(state, invariants, self.resume_from)
            result, eval_start = LoopResult.from_dict(state["loop"]), state.get("eval_loss_start")
            stream.restore(state["data_position"])
            if t.load_best_model_at_end:
                best = load_best(self.resume_from) or (trainable_state(model) if result.best_step == result.steps else None)
            resumed_at = result.steps
            position = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in state["data_position"].items())
            say(f"resumed from {self.resume_from} at step {result.steps} ({position})")
        remove_partial_writes(output_dir)

        def save(step: int) -> None:
            folder = output_dir / f"checkpoint-{step}"
            assert_finite(model, step)
            save_checkpoint(folder, model=model, tokenizer=tokenizer, config=self.resolved, optimizer=optimizer,
                            scheduler=scheduler,
                            state={"loop": result.to_dict(), "data_position": stream.position(),
                                   "eval_loss_start": eval_start, "settings": invariants},
                            best=best if result.best_step != step else None)  # else the saved weights are the best
            removed = prune_checkpoints(output_dir, t.save_total_limit) if t.save_total_limit else []
            say(f"saved checkpoint-{step}" + (f" (removed {', '.join(p.name for p in removed)})" if removed else ""))

        def remember_best(step: int, eval_loss: float) -> None:
            nonlocal best
            if t.load_best_model_at_end:
                best = trainable_state(model)

        loggers = build_loggers(self.cfg.logging, str(output_dir), self.resolved)
        callbacks = _RunCallbacks(loggers, save, remember_best)
        started = time.perf_counter()
        try:
            with stop_on_signals(callbacks):
                if eval_fn and eval_start is None:
                    eval_start = eval_fn()
                    say(f"eval loss at step 0: {eval_start:.4f}")
                    callbacks.on_log(0, {"eval_loss": eval_start, "eval_perplexity": math.exp(min(eval_start, 50))})
                result = train_loop(model, optimizer, scheduler, iter(stream), settings, eval_fn, callbacks, loss_fn,
                                    result=result)
                if result.stop_reason == "interrupted":
                    save(result.steps)
                    say(f"stopped at step {result.steps}; resume with --resume_from_checkpoint=auto")
                    raise KeyboardInterrupt
                # The final state is a checkpoint too: a finished run can be extended (a larger max_steps
                # and --resume_from_checkpoint=auto) without repeating a step.
                if result.steps != resumed_at:  # resumed at the end: that checkpoint is this state already
                    save(result.steps)
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

        eval_end = result.eval_history[-1][1] if result.eval_history else None
        if t.load_best_model_at_end and best is not None and result.best_step != result.steps:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in best:
                        param.copy_(best[name])
            eval_end = result.best_eval_loss
            say(f"restored the best weights: step {result.best_step}, eval loss {result.best_eval_loss:.4f}")
        return TrainOutcome(result, eval_start, eval_end, wall, settings)

    # -- save ----------------------------------------------------------------------------------------

    def publish(self, model: Any, tokenizer: Any, outcome: TrainOutcome) -> None:
        """The trained weights (or adapter), tokenizer and resolved config into output_dir, each file renamed into place."""
        assert_finite(model, outcome.result.steps)
        publish_into(self.output_dir, lambda tmp: save_model_files(model, tokenizer, self.resolved, tmp))

    def summary(self, outcome: TrainOutcome, model: Any) -> dict[str, Any]:
        """The summary fields every training recipe reports."""
        result, output_dir = outcome.result, self.output_dir
        best_checkpoint = output_dir / f"checkpoint-{result.best_step}"
        trainable, total = parameter_counts(model)
        return {
            "steps": result.steps,
            "stop_reason": result.stop_reason,
            "real_tokens": result.real_tokens,
            "train_seconds": result.train_seconds,
            "tokens_per_s": result.tokens_per_s,
            "warmup_steps_excluded": outcome.settings.timing_warmup_steps,
            "wall_seconds": outcome.wall_seconds,
            "total_tokens": result.total_tokens,
            "final_train_loss": result.train_history[-1][1] if result.train_history else None,
            "eval_loss_start": outcome.eval_start,
            "eval_loss_end": outcome.eval_end,
            "last_eval_loss": result.eval_history[-1][1] if result.eval_history else None,
            "best_eval_loss": result.best_eval_loss,
            "best_step": result.best_step,
            "best_checkpoint": str(best_checkpoint) if result.best_step and best_checkpoint.is_dir() else (
                str(output_dir) if (self.t.load_best_model_at_end or result.best_step == result.steps) and result.best_step else None),
            "eval_history": result.eval_history,
            "skipped_steps": result.skipped_steps,
            "peak_memory_mb": peak_memory_mb(self.device),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
        }

    def write_summary(self, summary: dict[str, Any], outcome: TrainOutcome) -> None:
        """summary.json, summary.md and loss_curves.png in output_dir."""
        output_dir, start = self.output_dir, outcome.eval_start
        write_json(output_dir / "summary.json", summary)
        plot_losses(output_dir / "loss_curves.png", outcome.result.train_history,
                    ([(0, start)] if start is not None else []) + outcome.result.eval_history)
        (output_dir / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
