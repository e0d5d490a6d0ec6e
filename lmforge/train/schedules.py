"""Learning-rate schedules with linear warmup, as multipliers of the peak rate."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_multiplier(kind: str, step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
                  quadratic_warmup: bool = False) -> float:
    """The share of the peak learning rate at optimizer step `step` (0-based); `quadratic_warmup`
    (lr_quadratic_warmup) squares the warm-up's straight line."""
    if warmup_steps and step < warmup_steps:
        return ((step + 1) / (warmup_steps + 1)) ** (2 if quadratic_warmup else 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind}")


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    if warmup_steps is not None:
        return warmup_steps
    return int(round(total_steps * (warmup_ratio or 0.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
    quadratic_warmup: bool = False,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`min_ratio` (cosine_min_lr_ratio) is the floor the decay ends at, as a share of the peak rate."""
    schedule: Callable[[int], float] = lambda step: lr_multiplier(  # noqa: E731
        kind, step, total_steps, warmup_steps, min_ratio, quadratic_warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
