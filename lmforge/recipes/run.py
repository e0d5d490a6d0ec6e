"""The training setup every training recipe shares (`train`, `pretrain`), so every loop feature works in both.

A recipe reads top to bottom (torchtune's shape: setup → train → save) and gets each shared
part from one :class:`TrainingRun`::

    with TrainingRun(cfg, "train") as run:       # seed, device, precision, output_dir lock, resume point
        tokenizer = config_tokenizer(cfg, say=say)  # the one tokenizer loader (models.load)
        ...                                       # the recipe's own data, prepared before any weights load
        run.predict_peak(data)                    # the planner's predicted peak, said now and kept for summary.json
        plan = run.count_steps(rows)                     # steps, warm-up (warned when it eats the run), eval/save cadence
        model = run.model(tokenizer)              # base (or new) weights, quantization, adapter, dropout, freezing
        objective = run.objective()               # what is learned (train.objectives), with the run's head choice
        outcome = run.train(model, tokenizer, stream, plan, objective=objective, eval_fn=..., invariants=...)
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
- what the loss is (label_smoothing_factor, chunked_cross_entropy, the fused head): `objective`;
- when and what to save (save_strategy, save_only_model): `count_steps` and `train`'s `save`;
- optimizer and schedule keys: `optimizer`; loggers (use_tensorboard, trackers): `train`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import publish_into, write_json, write_text
from lmforge.config import LmforgeConfig
from lmforge.config.checks import warmup_warning
from lmforge.config.sections import TrainingSection
from lmforge.data.batching import Batch
from lmforge.errors import LmforgeError
from lmforge.models.adapters import parameter_counts
from lmforge.models.kernels import fused_loss
from lmforge.plan.runcheck import PeakCheck, start_peak_check
from lmforge.recipes.console import say
from lmforge.train.checkpoint import (
    list_checkpoints,
    load_best,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_writes,
    resolve_resume,
    save_checkpoint,
)
from lmforge.train.distributed import engine_for
from lmforge.train.engine import TorchEngine
from lmforge.train.loggers import build_loggers
from lmforge.train.loop import Callbacks, LoopResult, LoopSettings, LossFn, NonFiniteError, evaluate, train_loop
from lmforge.train.objectives import Objective, as_objective, objective_from_config
from lmforge.train.optimizers import build_optimizer
from lmforge.redact import redact
from lmforge.train.summary import plot_losses, summary_markdown
from lmforge.train.runlock import RunLock
from lmforge.train.schedules import build_scheduler, warmup_steps_for
from lmforge.train.signals import sigterm_as_interrupt, stop_on_signals
from lmforge.train.stream import ResumableStream
from lmforge.device import cpu_supports_bf16, peak_memory_mb, pick_device, resolve_bf16, set_tf32


# A checkpoint's data position means the same batches (windows, masks) only under the same settings: the config
# keys a resume compares, beside the facts each recipe adds about its data (its example or token count).
RESUME_INVARIANTS = ("seed", "micro_batch_size", "gradient_accumulation_steps", "group_by_length", "sequence_len",
                     "sample_packing", "objective", "mlm_probability", "val_set_size")

# fp16 trains under autocast with a loss scaler: torch's GradScaler, on CUDA and on CPUs (float16 CPU autocast; CPUs
# without AVX512-FP16 or AMX-FP16 compute it slower than fp32, which validate's notice says).
FP16_DEVICE_TYPES = ("cuda", "cpu")


@dataclass
class StepCounts:
    """How long the run is and how often it evaluates and saves, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int | None
    save_every: int | None


def count_steps(t: TrainingSection, rows: int, world_size: int = 1) -> StepCounts:
    """Optimizer steps per epoch and in all for `rows` training rows (examples, packed rows or
    token windows), warm-up, and eval/save intervals from the *_per_epoch keys and the
    save_strategy / eval_strategy (epoch: once per epoch; no: never). Under several
    ranks each step takes gradient_accumulation_steps micro-batches on every rank."""
    micro_batches = math.ceil(rows / t.micro_batch_size)
    per_epoch = max(1, math.ceil(micro_batches / (t.gradient_accumulation_steps * world_size)))
    total = t.max_steps or max(1, math.ceil(per_epoch * t.num_epochs))
    eval_every = t.eval_steps or (max(1, per_epoch // t.evals_per_epoch) if t.evals_per_epoch else None)
    save_every = t.save_steps or (max(1, per_epoch // t.saves_per_epoch) if t.saves_per_epoch else None)
    eval_every = {"epoch": per_epoch, "no": None}.get(t.eval_strategy or "steps", eval_every)
    save_every = {"epoch": per_epoch, "no": None}.get(t.save_strategy or "steps", save_every)
    return StepCounts(per_epoch, total, warmup_steps_for(total, t.warmup_steps, t.warmup_ratio), eval_every, save_every)


@dataclass
class TrainOutcome:
    """What `TrainingRun.train` hands back to the recipe."""

    result: LoopResult
    eval_start: float | None  # eval loss before the first step (None without an eval set)
    eval_end: float | None  # eval loss of the weights the run ends with (the best, with load_best_model_at_end)
    wall_seconds: float
    settings: LoopSettings
    # do_causal_lm_eval: (step, {causal_lm/<metric>: value}) at each eval, step 0 included
    generation_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    objective_metrics: dict[str, float] | None = None  # the objective's own numbers at the last log (DPO's rewards/...)


# What the loop logs of its own; any other logged name is the objective's (summary.json keeps its last values).
LOOP_METRICS = frozenset({"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "peak_memory_mb", "eval_loss", "eval_perplexity"})


class _RunCallbacks(Callbacks):
    def __init__(self, loggers: list, save: Callable[[int], None], on_best: Callable[[int, float], None],
                 after_eval: Callable[[int], None] | None = None,
                 extra_metrics: Callable[[], dict[str, float]] | None = None) -> None:
        self.loggers, self.save, self.best, self.after_eval = loggers, save, on_best, after_eval
        self.extra_metrics = extra_metrics
        self.objective_metrics: dict[str, float] | None = None
        self.step_begin: Callable[[int], None] | None = None  # LISA's layer draw (lmforge.train.lisa)

    def on_step_begin(self, step: int) -> None:
        if self.step_begin is not None:
            self.step_begin(step)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.extra_metrics is not None and "loss" in metrics:  # a training step's log: add the recipe's own numbers
            metrics = {**metrics, **self.extra_metrics()}
        objective_metrics = {k: v for k, v in metrics.items() if k not in LOOP_METRICS}
        if objective_metrics:
            self.objective_metrics = objective_metrics
        for logger in self.loggers:
            logger.log(step, metrics)
        if "eval_loss" in metrics and self.after_eval is not None:  # each eval, step 0 too: the generation metrics
            self.after_eval(step)

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


class TrainingRun:
    """One training run's shared parts; see the module docstring for the order a recipe uses them in."""

    def __init__(self, cfg: LmforgeConfig, command: str = "train") -> None:
        self.cfg = cfg
        self.t = cfg.training
        self.command = command
        # One process, or one rank of several (torchrun): DDP, FSDP2 or DeepSpeed (lmforge.train.distributed).
        self.engine = engine_for(cfg, pick_device())
        self.device = self.engine.device
        self.speed = cfg.speed
        # fp16 (CUDA or CPU autocast, with a GradScaler) takes the place of bf16: auto.
        self.bf16 = resolve_bf16(self.t.bf16, self.device) and not (self.speed.fp16 and self.t.bf16 == "auto")
        self.fp16 = self.speed.fp16
        if self.fp16 and self.device.type not in FP16_DEVICE_TYPES:
            raise LmforgeError(f"fp16 training needs CUDA (with a gradient scaler) and the device is {self.device.type}",
                               where="fp16", fix="use bf16: true, or bf16: false for fp32")
        self.autocast_dtype = torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None
        if self.speed.tf32 is not None and self.device.type == "cuda":
            set_tf32(self.speed.tf32)
        self.output_dir = Path(self.t.output_dir)
        self.resolved = redact(cfg.flat())  # saved beside every checkpoint and output (and sent to trackers): no secrets
        self.lock = RunLock(self.output_dir, command, say)
        self.resume_from: Path | None = None
        self.peak_check: PeakCheck | None = None
        self._loggers: list = []

    # -- setup ---------------------------------------------------------------------------------------

    def __enter__(self) -> "TrainingRun":
        for warning in self.cfg.warnings:
            say(f"warning: {warning}")
        # Measured on an AVX2-only EPYC: 1 GFLOP/s in bf16 against 140 in fp32 (torch emulates bf16 there).
        emulated_bf16 = self.device.type == "cpu" and not cpu_supports_bf16()
        if self.bf16 and emulated_bf16:
            say("warning: bf16: true on a CPU without native bf16 (AVX512-BF16 or AMX): torch emulates bf16 matmuls, "
                "often 10-100x slower than fp32 (bf16: auto picks fp32 on this CPU and bf16 where it is fast)")
        q = self.cfg.quantization
        if q.load_in_4bit and q.bnb_4bit_compute_dtype == "bfloat16" and emulated_bf16:
            say("warning: bnb_4bit_compute_dtype: bfloat16 on a CPU without native bf16 (AVX512-BF16 or AMX): the 4-bit "
                "matmuls run in emulated bf16, often 10-100x slower (bnb_4bit_compute_dtype: auto picks float32 here)")
        torch.manual_seed(self.t.seed)
        self._sigterm = sigterm_as_interrupt()
        self._sigterm.__enter__()
        try:
            if self.engine.distributed:
                say(f"{self.engine.describe()}; global batch {self.t.micro_batch_size} × "
                    f"{self.t.gradient_accumulation_steps} × {self.engine.world_size} ranks")
            resume = None
            if self.engine.is_main:  # rank 0 holds the lock and picks the checkpoint; the others follow
                self.lock.acquire()
                t = self.t
                setting = "auto" if t.auto_resume_from_checkpoints and not t.resume_from_checkpoint else t.resume_from_checkpoint
                resume = resolve_resume(setting, self.output_dir, say)
                earlier = list_checkpoints(self.output_dir)
                if earlier and not resume:
                    say(f"note: {self.output_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in earlier[:3])}); "
                        "this run starts at step 0 and replaces those it reaches (to continue instead: --resume_from_checkpoint=auto)")
            resume = self.engine.broadcast(str(resume) if resume else None)
            self.resume_from = Path(resume) if resume else None
            # Every run checks the planner: the memory baseline is taken here, before any tokenizer, data or weights.
            self.peak_check = start_peak_check(self.cfg)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # Loggers live as long as the run, so the published output can still be logged (wandb_log_model: end).
        for logger in self._loggers:
            logger.close()
        if self.engine.is_main:
            self.lock.release()
        self._sigterm.__exit__(None, None, None)
        self.engine.close()

    def predict_peak(self, prepared: Any = None) -> None:
        """The planner's peak memory for this run (from the config and the prepared data), said now and
        written with the measured peak into summary.json; a planner failure is reported, never fatal."""
        if self.peak_check is not None:
            self.peak_check.predict(self.cfg, prepared, say)

    def main_first(self) -> Any:
        """A block rank 0 runs first (preparing data, training a tokenizer, writing shards and caches),
        then the other ranks, which find its results; in one process, just the block."""
        return self.engine.main_first()

    @property
    def data_shard(self) -> dict[str, int]:
        """This rank's share of the micro-batches (keyword arguments of the streams in lmforge.train.stream)."""
        return {"rank": self.engine.rank, "world_size": self.engine.world_size}

    def count_steps(self, rows: int) -> StepCounts:
        plan = count_steps(self.t, rows, self.engine.world_size)
        # With max_steps set, the config checks already warned (validate says it too).
        if self.t.max_steps is None and (line := warmup_warning(self.t, plan.warmup_steps, plan.total_steps)):
            say(f"warning: {line}")
        return plan

    def model(self, tokenizer: Any, new_model: Any = None) -> Any:
        """The model to train: `new_model` (built from scratch) or the config's base model, with
        quantization, adapter, dropout, frozen weights and gradient checkpointing as configured."""
        from lmforge.models.setup import training_model

        # FSDP2 and ZeRO-3 load on the CPU (load_device) and train on the GPU: kernels are chosen for the latter.
        model = training_model(self.cfg, tokenizer, self.engine.load_device, self.bf16, new_model=new_model, say=say,
                               train_device=self.device)
        model = self.engine.prepare(model, self.cfg, self.bf16, say)  # FSDP shards it here
        trainable, total = parameter_counts(model)
        source = f"new {model.config.model_type}" if new_model is not None else self.cfg.model.base_model
        say(f"model {source}: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})"
            + (f"; dropout {self.t.dropout}" if self.t.dropout is not None else ""))
        return model

    def objective(self) -> Objective:
        """The config's objective (train.objectives.objective_from_config) with this device's output-head choice.

        Training and evaluation use the same one (evaluation without label smoothing), so evaluation never
        builds the full logits a training step avoids: else the step-0 eval is the run's peak, and a run
        that fits only thanks to chunked_cross_entropy or a fused head dies before its first step.
        """
        objective = objective_from_config(self.cfg)
        if (fused := fused_loss(self.speed, self.device, say)) is not None:
            if not objective.supports_fused_head:
                raise LmforgeError(f"fused output-head losses compute causal-LM cross-entropy; this run trains {objective.name}",
                                   where="liger_fused_linear_cross_entropy" if fused == "liger" else "cut_cross_entropy",
                                   fix="remove the key for this run")
            objective = replace(objective, fused=fused)  # type: ignore[type-var]
        return objective

    def with_reference(self, objective: Objective, model: Any) -> Objective:
        """The objective with its reference model: none needed when the batches carry precomputed reference
        log-probabilities or the policy is a LoRA/QLoRA model (its adapter switched off is the reference);
        else a frozen copy of the starting weights (taken before any checkpoint is loaded)."""
        if getattr(objective, "reference", None) is not None or self.cfg.rl.precompute_ref_log_probs \
                or hasattr(getattr(model, "module", model), "disable_adapter"):
            return objective
        if self.engine.distributed:
            raise LmforgeError(f"rl: {self.cfg.rl.rl} with full fine-tuning on several ranks needs a reference copy, which "
                               "lmforge does not shard yet", where="rl",
                               fix="use adapter: lora (the reference is the base), or precompute_ref_log_probs: true")
        import copy

        reference = copy.deepcopy(model).eval().requires_grad_(False)
        say(f"reference model: a frozen copy of the starting weights ({sum(p.numel() for p in reference.parameters()):,} parameters)")
        return objective.with_reference(reference)  # type: ignore[attr-defined]

    def evaluate(self, model: Any, batches: Iterable[Batch], objective: LossFn) -> float:
        """Mean per-token loss of `objective` (for_evaluation: no label smoothing), with the run's device and
        precision, over all ranks."""
        settings = self.loop_settings(StepCounts(1, 0, 0, None, None))
        objective = as_objective(objective).for_evaluation()
        if isinstance(self.engine, TorchEngine):  # several ranks, or a sharded model: every rank takes part
            return self.engine.evaluate(model, list(batches), settings, objective)
        return evaluate(model, iter(batches), settings, objective)

    def call(self, model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args)`` for any other use of the trained model (generation, metrics); every rank calls it.
        Under the training autocast: a bf16 base with fp32 adapter weights runs only there."""
        with torch.autocast(self.device.type, self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext():
            return self.engine.call(model, fn, *args, **kwargs)

    def loop_settings(self, plan: StepCounts, has_eval: bool = False) -> LoopSettings:
        t = self.t
        return LoopSettings(
            # fp16: torch's GradScaler, except under DeepSpeed, whose engine scales the loss itself (a second
            # scaler beside it finds no gradients to unscale: "No inf checks were recorded").
            grad_scaler=torch.amp.GradScaler(self.device.type) if self.fp16 and not self.engine.owns_loss_scaling else None,
            # On CPU the saved activations are in CPU memory already (validate said so): nothing to move.
            # gradient_checkpointing: offload is checkpointing with the checkpointed activations offloaded: the same hooks.
            offload_activations=(self.speed.activation_offloading or t.gradient_checkpointing == "offload")
            and self.device.type == "cuda",
            loss_watchdog_threshold=t.loss_watchdog_threshold,
            loss_watchdog_patience=t.loss_watchdog_patience,
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
            sync=self.engine.sync,
            show_progress=self.engine.is_main,
        )

    def optimizer(self, model: Any, plan: StepCounts) -> tuple[torch.optim.Optimizer, Any]:
        t = self.t
        optimizer = build_optimizer(model, t.optimizer, t.learning_rate, t.weight_decay, (t.adam_beta1, t.adam_beta2),
                                    t.adam_epsilon, t.sgd_momentum, t.sgd_nesterov)
        scheduler = build_scheduler(optimizer, t.lr_scheduler, plan.total_steps, plan.warmup_steps, t.cosine_min_lr_ratio or 0.0,
                                    t.lr_quadratic_warmup)
        return optimizer, scheduler

    # -- train ---------------------------------------------------------------------------------------

    def train(
        self,
        model: Any,
        tokenizer: Any,
        stream: ResumableStream,
        plan: StepCounts,
        *,
        objective: Objective,
        eval_fn: Callable[[], float] | None = None,
        invariants: dict[str, Any],
        generation_eval: Callable[[], dict[str, float]] | None = None,
        extra_metrics: Callable[[], dict[str, float]] | None = None,
    ) -> TrainOutcome:
        """Train `objective` (usually ``self.objective()``) to plan.total_steps (or early stopping), resuming
        when asked, checkpointing as configured.

        `invariants` are the recipe's facts the data position depends on (beside the RESUME_INVARIANTS config
        keys); a resume refuses a checkpoint saved under others. On SIGTERM/SIGINT: a checkpoint, then
        KeyboardInterrupt (exit 130). `extra_metrics` (GRPO's rewards, KL, timings) is read at each training log
        and logged with the loop's numbers.
        """
        t, output_dir, engine = self.t, self.output_dir, self.engine
        if t.eval_strategy == "no":
            eval_fn = None
        if objective.needs_reference_model:
            objective = self.with_reference(objective, model)
        flat = self.cfg.flat()
        invariants = {**{k: flat.get(k) for k in RESUME_INVARIANTS}, **invariants}
        optimizer, scheduler = self.optimizer(model, plan)
        step_model, step_call, step_optimizer = engine.for_training(model, objective, optimizer)
        step_objective = objective.through(step_call)  # the engine's wrapper runs it; counts stay the objective's
        if "gradient_accumulation_steps" in invariants:  # the data position depends on the global batch, not its split
            invariants = {k: v for k, v in invariants.items() if k != "gradient_accumulation_steps"}
            invariants["micro_batches_per_step"] = t.gradient_accumulation_steps * engine.world_size
        settings = self.loop_settings(plan, has_eval=eval_fn is not None)
        result, eval_start, best = LoopResult(), None, None
        resumed_at = None
        if self.resume_from:
            state = load_checkpoint(self.resume_from, model, optimizer, scheduler, weights=engine.load_weights(model, optimizer),
                                    rank=engine.rank, world_size=engine.world_size)
            check_resumable(state, invariants, self.resume_from)
            result, eval_start = LoopResult.from_dict(state["loop"]), state.get("eval_loss_start")
            if settings.grad_scaler is not None and state.get("grad_scaler"):
                settings.grad_scaler.load_state_dict(state["grad_scaler"])
            stream.restore(state["data_position"])
            if t.load_best_model_at_end:
                best = load_best(self.resume_from) or (engine.trainable_state(model) if result.best_step == result.steps else None)
            resumed_at = result.steps
            position = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in state["data_position"].items()
                                 if not isinstance(v, (list, dict)))  # a stored generation (GRPO) is no reading
            say(f"resumed from {self.resume_from} at step {result.steps} ({position})")
            if state.get("rng_note") and engine.is_main:
                say(f"note: {state['rng_note']}")
        qat = self.cfg.quantization.qat
        if qat is not None and qat.fake_quant_after_n_steps:
            from lmforge.models.qat import delay_fake_quant

            delay_fake_quant(model, optimizer, qat.fake_quant_after_n_steps, result.steps)
        if engine.is_main:
            remove_partial_writes(output_dir)
        engine.barrier()

        def save(step: int) -> None:
            folder = output_dir / f"checkpoint-{step}"
            engine.assert_finite(model, step)
            weights, rng_ranks = engine.checkpoint_weights(model, optimizer), engine.rng_states()
            if engine.is_main:
                save_checkpoint(folder, model=model, tokenizer=tokenizer, config=self.resolved,
                                optimizer=None if t.save_only_model else optimizer, scheduler=scheduler,
                                state={"loop": result.to_dict(), "data_position": stream.position(),
                                       "eval_loss_start": eval_start, "settings": invariants,
                                       # fp16: the loss scale and its growth count, so a resume scales as the run did
                                       "grad_scaler": settings.grad_scaler.state_dict() if settings.grad_scaler else None},
                                best=best if result.best_step != step else None,  # else the saved weights are the best
                                weights=weights, rng_ranks=rng_ranks)
                removed = prune_checkpoints(output_dir, t.save_total_limit) if t.save_total_limit else []
                say(f"saved checkpoint-{step}" + (f" (removed {', '.join(p.name for p in removed)})" if removed else ""))
                if self.cfg.logging.wandb_log_model == "checkpoint":
                    upload(folder, f"checkpoint-{step}")
            elif weights is not None:
                weights(None)  # this rank's shards, into the folder rank 0 named
            engine.barrier()

        def remember_best(step: int, eval_loss: float) -> None:
            nonlocal best
            if t.load_best_model_at_end:
                best = engine.trainable_state(model)

        loggers = build_loggers(self.cfg.logging, str(output_dir), self.resolved, model=model) if engine.is_main else []
        self._loggers = loggers

        def upload(folder: Path, name: str) -> None:
            for logger in loggers:
                logger.log_model(folder, name)

        generation_history: list[tuple[int, dict[str, float]]] = []

        def after_eval(step: int) -> None:
            """do_causal_lm_eval: generation metrics after each eval loss, logged beside it."""
            metrics = self.call(model, lambda _model: generation_eval())
            generation_history.append((step, metrics))
            if metrics:
                say("eval generations at step {}: {}".format(step, ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items())))
            for logger in loggers:
                logger.log(step, metrics)

        callbacks = _RunCallbacks(loggers, save, remember_best, after_eval if generation_eval is not None and eval_fn else None,
                                   extra_metrics)
        sampler = None
        if t.lisa_n_layers and t.lisa_step_interval:
            if engine.distributed:  # DDP's reducer and sharded weights expect the same trainable weights every step
                raise LmforgeError("LISA changes which layers train every lisa_step_interval steps, which lmforge does not "
                                   "do across several ranks yet", where="lisa_n_layers", fix="train LISA in one process")
            from lmforge.train.lisa import LayerSampler

            sampler = LayerSampler(model, t.lisa_n_layers, t.lisa_step_interval, t.lisa_layers_attribute, t.seed)
            if sampler.n_layers < len(sampler.trainable):
                callbacks.step_begin = sampler.at_step
                say(f"LISA: {t.lisa_n_layers} of {len(sampler.trainable)} layers train at a time, redrawn every "
                    f"{t.lisa_step_interval} steps")
            else:
                say(f"warning: lisa_n_layers: {t.lisa_n_layers} is not fewer than the model's {len(sampler.trainable)} "
                    "layers: every layer trains at every step (LISA changes nothing for this model)")
        started = time.perf_counter()
        try:
            with stop_on_signals(callbacks):
                if eval_fn and eval_start is None:
                    eval_start = eval_fn()
                    say(f"eval loss at step 0: {eval_start:.4f}")
                    callbacks.on_log(0, {"eval_loss": eval_start, "eval_perplexity": math.exp(min(eval_start, 50))})
                result = train_loop(step_model, step_optimizer, scheduler, iter(stream), settings, eval_fn, callbacks,
                                    step_objective, result=result)
                if sampler is not None:
                    sampler.release()
                if result.stop_reason == "interrupted":
                    save(result.steps)
                    say(f"stopped at step {result.steps}; resume with --resume_from_checkpoint=auto")
                    raise KeyboardInterrupt
                # The final state is a checkpoint too: a finished run can be extended (a larger max_steps
                # and --resume_from_checkpoint=auto) without repeating a step.
                # save_strategy: no asks for no checkpoints (a signal still saves one above).
                if result.steps != resumed_at and t.save_strategy != "no":  # resumed at the end: that checkpoint is this state
                    save(result.steps)
        except NonFiniteError as exc:
            good = next(iter(list_checkpoints(output_dir)), None)
            raise LmforgeError(
                f"{exc.message}; stopped without saving", where="training",
                fix=(f"last good checkpoint: {good}; " if good else "no checkpoint was saved; ")
                + "lower learning_rate, set max_grad_norm, or set nan_policy: skip",
            ) from exc
        wall = time.perf_counter() - started

        eval_end = result.eval_history[-1][1] if result.eval_history else None
        if t.load_best_model_at_end and best is not None and result.best_step != result.steps:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in best:
                        param.copy_(best[name])
            eval_end = result.best_eval_loss
            say(f"restored the best weights: step {result.best_step}, eval loss {result.best_eval_loss:.4f}")
        return TrainOutcome(result, eval_start, eval_end, wall, settings, generation_history, callbacks.objective_metrics)

    # -- save ----------------------------------------------------------------------------------------

    def publish(self, model: Any, tokenizer: Any, outcome: TrainOutcome) -> None:
        """The trained weights (or adapter), tokenizer and resolved config into output_dir, each file renamed into place
        (consolidated from every rank's shards under FSDP; rank 0 writes)."""
        engine = self.engine
        engine.assert_finite(model, outcome.result.steps)
        if self.cfg.quantization.qat is not None and engine.world_size == 1:
            # The fake-quantised layers back to plain ones (their weights and names are the same, so under
            # several ranks the saved files are too, unconverted): the output is an ordinary model.
            from lmforge.models.qat import convert_qat

            convert_qat(model, self.cfg.quantization.qat)
        if engine.is_main:
            publish_into(self.output_dir, lambda tmp: engine.save_model_files(model, tokenizer, self.resolved, tmp))
        else:
            engine.save_model_files(model, tokenizer, self.resolved, None)  # takes part in gathering the weights
        engine.barrier()
        if self.cfg.logging.wandb_log_model == "end":
            for logger in self._loggers:
                logger.log_model(self.output_dir, "model")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics computed after the loop (lm_eval_tasks at the end of `train`) into the run's trackers (rank 0)."""
        for logger in self._loggers:
            logger.log(step, metrics)

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
            **({"causal_lm_eval_history": outcome.generation_history,
                "causal_lm_eval_end": outcome.generation_history[-1][1]} if outcome.generation_history else {}),
            "skipped_steps": result.skipped_steps,
            "peak_memory_mb": peak_memory_mb(self.device),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            **(self.peak_check.finish() if self.peak_check else {}),  # predicted vs measured peak (lmforge.plan)
            **({"train_metrics": outcome.objective_metrics} if outcome.objective_metrics else {}),
            "ranks": self.engine.world_size,
            "engine": self.engine.name,
        }

    def write_summary(self, summary: dict[str, Any], outcome: TrainOutcome) -> None:
        """summary.json, summary.md and loss_curves.png in output_dir (rank 0)."""
        if not self.engine.is_main:
            return
        output_dir, start = self.output_dir, outcome.eval_start
        write_json(output_dir / "summary.json", summary)
        plot_losses(output_dir / "loss_curves.png", outcome.result.train_history,
                    ([(0, start)] if start is not None else []) + outcome.result.eval_history)
        write_text(output_dir / "summary.md", summary_markdown(summary))
        if self.t.hub_model_id:  # last: the repo gets the summary too
            from lmforge.export.hub import push_output

            push_output(output_dir, self.t.hub_model_id, self.t.hub_revision, say)
