"""The training loop: short on purpose, because this is the step we must make fast.

One optimizer step = `grad_accum` micro-batches; the loss is the sum over every counted
token of the step divided by their count, so short and long examples weigh the same
whatever batch they land in. What is counted and summed is the objective's business
(lmforge.train.objectives): the loop knows no objective's details.

Host-device syncs: one per step, none per micro-batch. In one process, after the step's backward
passes and the clipping, the loop reads the step's summed loss and the gradient norm back together
(one transfer); the NaN/inf check, logging, early stopping and the loss watchdog all reuse those two
numbers. Everything data-dependent before that (the objective's token counts, where the labels are,
whether a batch is padded) is read from the host copy of the batch, which the micro-batches are
collated into before any device work: the step's token-weighted mean needs the token count of all
of its micro-batches before the first backward (``Objective.count_tokens`` reads it from the host batch). (Under several ranks the sums over ranks and
DeepSpeed's own norm read back once more; fp16's GradScaler reads its inf flag in `scaler.step`.)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from lmforge.data.batching import HOST_COPY, Batch, HostCopy
from lmforge.errors import LmforgeError
from lmforge.device import peak_memory_mb
from lmforge.train.objectives import CausalLM, Objective, as_objective

# An objective, or a bare (model, batch) -> (loss_sum, count) function taken as a causal-LM loss.
LossFn = Objective | Callable[[Any, Batch], tuple[torch.Tensor, int]]


@dataclass
class LoopSettings:
    total_steps: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    logging_steps: int = 1
    eval_every: int | None = None  # with an eval_fn, the last step is always evaluated too
    save_every: int | None = None
    early_stopping_patience: int | None = None
    nan_policy: str = "stop"  # or "skip"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None
    timing_warmup_steps: int = 2  # first steps pay one-off costs (allocations, kernel choice); kept out of tokens/s
    grad_scaler: Any = None  # fp16: a torch.amp.GradScaler (loss scaled up, gradients unscaled before clipping)
    offload_activations: bool = False  # keep tensors saved for backward (not the weights) in (pinned) CPU memory
    loss_watchdog_threshold: float | None = None  # stop once the loss stays above this ...
    loss_watchdog_patience: int = 3  # ... for this many steps in a row
    sync: Any = None  # several ranks: lmforge.train.engine.StepSync (sums over ranks, gradient-sync control)
    show_progress: bool = True  # the progress bar and step lines (rank 0 only under several ranks)


@dataclass
class LoopResult:
    """Everything about the run so far; a checkpoint stores it (trainer_state.json) so a resume continues it."""

    steps: int = 0
    real_tokens: int = 0  # non-pad tokens in timed steps
    train_seconds: float = 0.0  # timed steps only
    warmup_tokens: int = 0  # the warm-up steps' own: tokens/s of a run too short to have timed steps
    warmup_seconds: float = 0.0
    total_tokens: int = 0
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    train_history: list[tuple[int, float]] = field(default_factory=list)
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    stop_reason: str | None = None  # None (ran to total_steps), "early_stopping", "interrupted", "data_exhausted", "loss_watchdog"

    @property
    def tokens_per_s(self) -> float:
        if self.train_seconds:
            return self.real_tokens / self.train_seconds
        return self.warmup_tokens / self.warmup_seconds if self.warmup_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopResult":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("eval_history", "train_history"):
            known[key] = [tuple(pair) for pair in known.get(key, [])]
        return cls(**known)


class NonFiniteError(LmforgeError):
    """The loss or the gradient went NaN/inf at `step` (1-based); the weights are still those before it."""

    def __init__(self, step: int, what: str) -> None:
        self.step = step
        super().__init__(f"{what} is not finite at step {step}", where="training",
                         fix="lower learning_rate, set max_grad_norm, or set nan_policy: skip")


class Callbacks:
    """Hooks the recipe plugs in: logging, saving, the best eval. All optional.

    Setting `stop_requested` (e.g. from a signal handler) ends the loop after the current step.
    """

    stop_requested: bool = False

    def on_step_begin(self, step: int) -> None: ...  # before the 0-based `step`'s first forward (LISA's layer draw)

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_save(self, step: int) -> None: ...

    def on_best(self, step: int, eval_loss: float) -> None: ...


def _autocast(settings: LoopSettings) -> contextlib.AbstractContextManager:
    if settings.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.device.type, dtype=settings.autocast_dtype)


# Autograd nodes that only view or cast: a saved tensor reached through them from a parameter's AccumulateGrad is a weight.
_VIEW_OR_CAST = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0",
                           "ExpandBackward0", "ToCopyBackward0"})


def is_weight(tensor: torch.Tensor) -> bool:
    """Whether a tensor saved for backward is a weight: a parameter, a view of one (linear saves ``weight.t()``),
    or autocast's cast of a trainable one. (A frozen fp32 weight cast by autocast carries no trace of its origin.)"""
    if isinstance(tensor._base if tensor._base is not None else tensor, torch.nn.Parameter):
        return True
    node = tensor.grad_fn
    while node is not None and type(node).__name__ in _VIEW_OR_CAST and node.next_functions:
        node = node.next_functions[0][0]
    return node is not None and type(node).__name__ == "AccumulateGrad"


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """activation_offloading: tensors saved for backward wait in (pinned) CPU memory, as in torch's save_on_cpu,
    except weights, which stay where they are.

    Every linear layer saves its weight for backward. The weights are in device memory for the whole step
    anyway, so save_on_cpu's copy of them (to the host in forward, back in backward, every micro-batch: a
    LoRA base's frozen weights included) moved the whole model over PCIe twice per micro-batch and freed nothing.
    """

    def __init__(self, pin_memory: bool) -> None:
        def pack(tensor: torch.Tensor) -> Any:
            if is_weight(tensor):
                return tensor
            if not pin_memory:
                return tensor.device, tensor.cpu()
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=not tensor.is_sparse)
            host.copy_(tensor, non_blocking=not tensor.is_sparse)
            return tensor.device, host

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)


def _offload(settings: LoopSettings) -> contextlib.AbstractContextManager:
    if not settings.offload_activations:
        return contextlib.nullcontext()
    return OffloadActivations(pin_memory=settings.device.type == "cuda")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device` (copies queued without waiting), carrying its CPU original for the loss to read
    counts and positions from without a device sync (lmforge.data.batching.HostCopy)."""
    pin = device.type == "cuda"  # from pinned memory the copies are truly asynchronous (pageable memory may wait)
    moved = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}
    if device.type != "cpu":
        moved[HOST_COPY] = HostCopy(batch)  # type: ignore[assignment]
    return moved


@torch.no_grad()
def evaluate_sums(model: Any, batches: Iterator[Batch], settings: LoopSettings, loss_fn: LossFn = CausalLM(),
                  call: Callable[[Any, LossFn, Batch], Any] | None = None) -> tuple[float, int]:
    """Summed loss and token count over the eval batches (`call` runs loss_fn where a sharded model can)."""
    was_training = model.training
    model.eval()
    total: torch.Tensor | float = 0.0
    count = 0
    with _autocast(settings):
        for batch in batches:
            batch = _to_device(batch, settings.device)
            loss_sum, n, *_ = call(model, loss_fn, batch) if call else loss_fn(model, batch)
            total = total + loss_sum.detach().float()  # summed on the device: read back once, below
            count += n
    model.train(was_training)
    return float(total), count


def evaluate(model: Any, batches: Iterator[Batch], settings: LoopSettings, loss_fn: LossFn = CausalLM()) -> float:
    """Mean per-token loss over the eval batches."""
    total, count = evaluate_sums(model, batches, settings, loss_fn)
    return total / max(count, 1)


def _clip_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The gradient norm over all ranks (FSDP's sharded gradients included), clipped to `max_norm` when set;
    a device tensor, not read back."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # sharded gradients (DTensor): the norm of the whole
        norm = norm.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def clip_gradients(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The gradient norm as a number, clipped to `max_norm` when set (what several ranks' StepSync.clip returns)."""
    return float(_clip_norm(params, max_norm))


def _read_back(*values: torch.Tensor | float) -> list[float]:
    """Device scalars as floats, in one device-to-host transfer (one sync, not one per value)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device).reshape(()) for v in values]).tolist()
    return [float(v) for v in stacked]


def _record_eval(result: LoopResult, step: int, eval_loss: float, callbacks: Callbacks) -> None:
    result.eval_history.append((step, eval_loss))
    if result.best_eval_loss is None or eval_loss < result.best_eval_loss:
        result.best_eval_loss, result.best_step, result.evals_without_improvement = eval_loss, step, 0
        callbacks.on_best(step, eval_loss)
    else:
        result.evals_without_improvement += 1


def train_loop(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Iterator[Batch],
    settings: LoopSettings,
    eval_fn: Callable[[], float] | None = None,
    callbacks: Callbacks | None = None,
    loss_fn: LossFn = CausalLM(),
    start_step: int = 0,
    result: LoopResult | None = None,
) -> LoopResult:
    """Run optimizer steps until `settings.total_steps`, early stopping, a stop request or the batches run out.

    `loss_fn` is the objective (lmforge.train.objectives): each step divides the summed loss by the
    tokens its ``count_tokens`` finds in the step's host batches.

    Pass the `result` of a checkpoint to continue a run (its `steps` is the step to start from).
    """
    callbacks = callbacks or Callbacks()
    objective = as_objective(loss_fn)
    result = result or LoopResult(steps=start_step)
    start_step = result.steps
    result.stop_reason = None  # whatever stopped the run before (a signal, early stopping) ends with this call
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    sync = settings.sync
    # lmforge's own bar stays when the CLI hides the libraries' bars (TQDM_DISABLE); under several ranks, rank 0's only
    bar = tqdm(total=settings.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not settings.show_progress)
    say = bar.write if settings.show_progress else (lambda text: None)
    window_tokens, window_start = 0, time.perf_counter()
    # The objective's own numbers (DPO's rewards/accuracies, ...): the mean over the micro-batches since the last log.
    window_metrics: dict[str, Any] = {}
    window_metric_counts: dict[str, int] = {}
    scaler = settings.grad_scaler
    steps_over_threshold = 0
    for step in range(start_step, settings.total_steps):
        callbacks.on_step_begin(step)
        step_start = time.perf_counter()
        step_batches = [b for _, b in zip(range(settings.grad_accum), micro_batches)]
        if not step_batches:
            result.stop_reason = "data_exhausted"
            break
        # Counted on the host copies: no device sync.
        label_count = sum(objective.count_tokens(b) for b in step_batches)
        step_tokens = sum(int(b["attention_mask"].sum()) for b in step_batches)
        if sync:  # every rank divides by the labelled tokens of the whole step, over all ranks
            label_count, step_tokens = sync.sum_counts(label_count, step_tokens)
        step_loss_sum: torch.Tensor | float = 0.0  # summed on the device: no sync per micro-batch
        for i, batch in enumerate(step_batches):
            batch = _to_device(batch, settings.device)
            with sync.accumulating(model, i + 1 < len(step_batches)) if sync else contextlib.nullcontext():
                with _autocast(settings), _offload(settings):
                    loss_sum, _, objective_metrics = objective(model, batch)
                # DDP and FSDP average gradients over ranks: times the rank count, that is the global per-token mean.
                scaled = loss_sum / (max(label_count, 1) / (sync.world_size if sync else 1))
                if scaler is not None:
                    scaled = scaler.scale(scaled)
                sync.backward(scaled) if sync else scaled.backward()
            step_loss_sum = step_loss_sum + loss_sum.detach().float()
            for name, value in objective_metrics.items():  # summed on the device; read back only when logged
                window_metrics[name] = window_metrics.get(name, 0.0) + (value.detach().float() if torch.is_tensor(value) else value)
                window_metric_counts[name] = window_metric_counts.get(name, 0) + 1
        stop = callbacks.stop_requested
        if sync:  # one host sum: the step's loss, and a stop request every rank acts on at the same step
            step_loss, stop = sync.sum_loss(float(step_loss_sum), stop)
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip and report the true gradient norm
        if sync:
            grad_norm = sync.clip(params, settings.max_grad_norm)
        else:  # the step's one read-back: its loss and gradient norm in one transfer
            norm = _clip_norm(params, settings.max_grad_norm)
            step_loss, grad_norm = _read_back(step_loss_sum, norm)
        loss = step_loss / max(label_count, 1)
        scaler_skipped = sync.loss_scaler_skipped() if sync else False
        if scaler is not None and math.isfinite(loss):
            # fp16: an overflowed gradient is the scaler's business: it skips this update and lowers the scale.
            scaler.step(optimizer)
            scaler.update()
        elif scaler_skipped and math.isfinite(loss):
            pass  # fp16 under DeepSpeed: its own loss scaler found the overflow, skipped the update and lowered the scale
        elif math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
        else:  # the weights stay those of the last good step
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                # unscale_ ran this step: without update() the scaler's per-step state stays, and the next
                # step's unscale_ raises "unscale_() has already been called". update() also lowers the scale.
                scaler.update()
            what = "the loss" if not math.isfinite(loss) else "the gradient norm"
            if settings.nan_policy != "skip":
                bar.close()
                raise NonFiniteError(step + 1, what)
            result.skipped_steps.append(step + 1)
            say(f"step {step + 1}: {what} is not finite; step skipped (nan_policy: skip)")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - step_start
        result.steps = step + 1
        result.total_tokens += step_tokens
        if step - start_step >= settings.timing_warmup_steps:
            result.real_tokens += step_tokens
            result.train_seconds += elapsed
        else:
            result.warmup_tokens += step_tokens
            result.warmup_seconds += elapsed
        result.train_history.append((step + 1, loss))
        window_tokens += step_tokens
        bar.update(1)
        last = step + 1 == settings.total_steps
        if (step + 1) % settings.logging_steps == 0 or last:
            now = time.perf_counter()
            metrics = {
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                "tokens_seen": result.total_tokens,
                "peak_memory_mb": peak_memory_mb(settings.device),
            }
            names = sorted(window_metrics)  # every rank's objective returns the same names
            totals = [float(window_metrics[n]) for n in names] + [float(window_metric_counts[n]) for n in names]
            if sync and names:  # the objective's numbers over every rank's micro-batches, not rank 0's alone
                totals = sync.sum_floats(totals)
            for i, name in enumerate(names):
                metrics[name] = totals[i] / max(totals[len(names) + i], 1.0)
            window_metrics.clear()
            window_metric_counts.clear()
            window_tokens, window_start = 0, now
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            callbacks.on_log(step + 1, metrics)
        pause = time.perf_counter()  # eval and save time stays out of the tokens/s window
        if eval_fn and ((settings.eval_every and (step + 1) % settings.eval_every == 0) or last):
            eval_loss = eval_fn()
            _record_eval(result, step + 1, eval_loss, callbacks)
            say(f"step {step + 1}: eval loss {eval_loss:.4f}")
            callbacks.on_log(step + 1, {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})
            patience = settings.early_stopping_patience
            if patience and result.evals_without_improvement >= patience and not last:
                result.stop_reason = "early_stopping"
                say(f"step {step + 1}: no eval improvement in {patience} evaluations; stopping early")
                break
        if (stop if sync else callbacks.stop_requested) and not last:
            result.stop_reason = "interrupted"
            break
        threshold = settings.loss_watchdog_threshold
        steps_over_threshold = steps_over_threshold + 1 if threshold is not None and not loss <= threshold else 0
        if threshold is not None and steps_over_threshold >= settings.loss_watchdog_patience and not last:
            result.stop_reason = "loss_watchdog"
            bar.write(f"step {step + 1}: the loss stayed above loss_watchdog_threshold {threshold} for "
                      f"{steps_over_threshold} steps; stopping")
            break
        if settings.save_every and (step + 1) % settings.save_every == 0 and not last:
            callbacks.on_save(step + 1)
        window_start += time.perf_counter() - pause
    bar.close()
    return result
