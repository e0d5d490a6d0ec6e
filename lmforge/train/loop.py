"""The training loop: short on purpose, because this is the step we must make fast.

One optimizer step = `grad_accum` micro-batches; the loss is the sum over every labelled
token of the step divided by their count, so short and long examples weigh the same
whatever batch they land in.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from lmforge.data.batching import Batch
from lmforge.train.loss import causal_lm_loss
from lmforge.train.telemetry import peak_memory_mb

LossFn = Callable[[Any, Batch], tuple[torch.Tensor, int]]


@dataclass
class LoopSettings:
    total_steps: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    logging_steps: int = 1
    eval_every: int | None = None
    save_every: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None
    timing_warmup_steps: int = 2  # first steps pay one-off costs (allocations, kernel choice); kept out of tokens/s


@dataclass
class LoopResult:
    steps: int = 0
    real_tokens: int = 0  # non-pad tokens in timed steps
    train_seconds: float = 0.0  # timed steps only
    total_tokens: int = 0
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    train_history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.train_seconds if self.train_seconds else 0.0


class Callbacks:
    """Hooks the recipe plugs in: logging, saving. All optional."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_save(self, step: int) -> None: ...


def _autocast(settings: LoopSettings) -> contextlib.AbstractContextManager:
    if settings.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.device.type, dtype=settings.autocast_dtype)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: Any, batches: Iterator[Batch], settings: LoopSettings, loss_fn: LossFn = causal_lm_loss) -> float:
    """Mean per-token loss over the eval batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with _autocast(settings):
        for batch in batches:
            loss_sum, n = loss_fn(model, _to_device(batch, settings.device))
            total += float(loss_sum)
            count += n
    model.train(was_training)
    return total / max(count, 1)


def train_loop(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Iterator[Batch],
    settings: LoopSettings,
    eval_fn: Callable[[], float] | None = None,
    callbacks: Callbacks | None = None,
    loss_fn: LossFn = causal_lm_loss,
    start_step: int = 0,
) -> LoopResult:
    """Run optimizer steps until `settings.total_steps` or the batches run out."""
    callbacks = callbacks or Callbacks()
    result = LoopResult(steps=start_step)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = tqdm(total=settings.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start_step, settings.total_steps):
        step_start = time.perf_counter()
        step_batches = [b for _, b in zip(range(settings.grad_accum), micro_batches)]
        if not step_batches:
            break
        label_count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in step_batches)
        step_loss, step_tokens = 0.0, 0
        for batch in step_batches:
            batch = _to_device(batch, settings.device)
            with _autocast(settings):
                loss_sum, _ = loss_fn(model, batch)
            (loss_sum / max(label_count, 1)).backward()
            step_loss += float(loss_sum.detach())
            step_tokens += int(batch["attention_mask"].sum())
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)) if settings.max_grad_norm else math.nan
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - step_start
        result.steps = step + 1
        result.total_tokens += step_tokens
        if step - start_step >= settings.timing_warmup_steps:
            result.real_tokens += step_tokens
            result.train_seconds += elapsed
        loss = step_loss / max(label_count, 1)
        result.train_history.append((step + 1, loss))
        window_tokens += step_tokens
        bar.update(1)
        if (step + 1) % settings.logging_steps == 0 or step + 1 == settings.total_steps:
            now = time.perf_counter()
            metrics = {
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                "tokens_seen": result.total_tokens,
                "peak_memory_mb": peak_memory_mb(settings.device),
            }
            window_tokens, window_start = 0, now
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            callbacks.on_log(step + 1, metrics)
        if eval_fn and settings.eval_every and (step + 1) % settings.eval_every == 0 and step + 1 < settings.total_steps:
            eval_loss = eval_fn()
            result.eval_history.append((step + 1, eval_loss))
            bar.write(f"step {step + 1}: eval loss {eval_loss:.4f}")
            callbacks.on_log(step + 1, {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})
        if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < settings.total_steps:
            callbacks.on_save(step + 1)
    bar.close()
    return result
