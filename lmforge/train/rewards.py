"""GRPO's reward functions: the user's Python, loaded under the dataset hooks' rules and called as TRL calls them.

``trl.reward_funcs`` names functions as ``file.py:function`` or ``module.function``; the config has already
checked that each comes from the config's folder or an installed package (lmforge.config.hooks) and pinned it
to its file. Each is called once per generation batch::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list[float | None]

with one entry per completion: ``completions`` are texts, or ``[{"role": "assistant", "content": text}]`` for
prompts given as messages (TRL's conversational format); ``columns`` are the prompt rows' other columns (e.g.
``answer``), each a list aligned with the completions. None means "cannot score this one": TRL's rule, it is
left out of that function's mean, and a completion no function scores gets no advantage.

A function that raises, returns the wrong number of rewards or something that is not a number stops the run
with one line naming the function and its config key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lmforge.data.formats.hook import load_hook
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class RewardFunction:
    name: str  # the function's name: the metric rewards/<name>/mean
    spec: str  # as resolved: /abs/path/rewards.py:name or module.name
    where: str  # the config key: trl.reward_funcs[i]
    fn: Callable[..., Any]


def load_reward_functions(specs: Sequence[str]) -> list[RewardFunction]:
    out = []
    for index, spec in enumerate(specs):
        where = f"trl.reward_funcs[{index}]"
        fn = load_hook(spec, where)
        out.append(RewardFunction(getattr(fn, "__name__", spec.rpartition(":")[2]), spec, where, fn))
    names = [r.name for r in out]
    return [RewardFunction(f"{r.name}_{i}" if names.count(r.name) > 1 else r.name, r.spec, r.where, r.fn)
            for i, r in enumerate(out)]


def _as_reward(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (str, bytes)):  # float("1") would pass: a text is a bug in the function
        raise TypeError(type(value).__name__)
    return float(value)


def score(functions: Sequence[RewardFunction], prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
          columns: Mapping[str, list[Any]]) -> torch.Tensor:
    """Rewards [completions, functions] (NaN where a function returned None)."""
    count = len(completions)
    table = torch.empty(count, len(functions), dtype=torch.float32)
    for j, reward in enumerate(functions):
        label = f"reward function {reward.name} ({reward.spec.rpartition('/')[2]})"
        try:
            values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as exc:
            raise LmforgeError(f"{label} raised {type(exc).__name__}: {exc}", where=reward.where,
                               fix="fix the function (return None for a completion it cannot score)") from exc
        if values is None or isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
            raise LmforgeError(f"{label} returned {type(values).__name__}, not a list of {count} rewards", where=reward.where,
                               fix="return one float (or None) per completion")
        if len(values) != count:
            raise LmforgeError(f"{label} returned {len(values)} rewards for {count} completions", where=reward.where,
                               fix="return one float (or None) per completion, in the order of `completions`")
        for i, value in enumerate(values):
            try:
                table[i, j] = _as_reward(value)
            except (TypeError, ValueError) as exc:
                raise LmforgeError(f"{label} returned {value!r} for completion {i}, not a number", where=reward.where,
                                   fix="return one float (or None) per completion") from exc
    return table
