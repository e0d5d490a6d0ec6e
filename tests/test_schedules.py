"""Learning-rate schedules: exact values with warmup steps or ratio, and the cosine floor."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.train.schedules import build_scheduler, lr_multiplier, warmup_steps_for


def _lrs(kind: str, total: int, warmup: int, min_ratio: float = 0.0, peak: float = 0.1) -> list[float]:
    """The learning rate each optimizer step actually uses."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_scheduler(optimizer, kind, total, warmup, min_ratio)
    used = []
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"] / peak)
        optimizer.step()
        scheduler.step()
    return used


def test_constant_with_warmup() -> None:
    assert _lrs("constant", 6, 2) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])


def test_linear_decays_to_zero() -> None:
    assert _lrs("linear", 4, 0) == pytest.approx([1, 0.75, 0.5, 0.25])
    assert _lrs("linear", 5, 1) == pytest.approx([0.5, 1, 0.75, 0.5, 0.25])


def test_cosine_half_wave() -> None:
    expected = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert _lrs("cosine", 4, 0) == pytest.approx(expected)
    assert _lrs("cosine", 4, 0)[2] == pytest.approx(0.5)


def test_cosine_min_lr_ratio_is_the_floor() -> None:
    lrs = _lrs("cosine", 12, 2, min_ratio=0.1)
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lrs[2] == pytest.approx(1.0)
    assert min(lrs[2:]) > 0.1
    assert lr_multiplier("cosine", 12, 12, 2, 0.1) == pytest.approx(0.1)  # the end of the decay
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])), "cosine must not increase after warmup"


def test_warmup_ratio_and_steps() -> None:
    assert warmup_steps_for(100, None, 0.1) == 10
    assert warmup_steps_for(100, 3, None) == 3
    assert warmup_steps_for(100, None, None) == 0
    lrs = _lrs("linear", 20, warmup_steps_for(20, None, 0.25))
    assert lrs[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])


def test_schedule_state_resumes_exactly() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, "cosine", 10, 2, 0.2)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state, lr = scheduler.state_dict(), optimizer.param_groups[0]["lr"]
    fresh_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = build_scheduler(fresh_opt, "cosine", 10, 2, 0.2)
    fresh_opt.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(state)
    assert fresh_opt.param_groups[0]["lr"] == lr
    fresh.step()
    scheduler.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr()
