"""The objective interface: what every training objective is (lmforge.train.objectives holds the objectives).

Its own module so that objectives kept in other files (train.preference, train.grpo) and the factory that picks
one from the config (objectives.objective_from_config) import it without importing each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lmforge.data.batching import Batch

# What an objective returns for one micro-batch: the loss summed over its tokens (a device scalar), how many
# tokens that sum covers, and named extra numbers (device scalars or floats) for logging.
ObjectiveOutput = tuple[torch.Tensor, int, dict[str, Any]]


class Objective(ABC):
    """What a training run learns: the loss of a batch, and the tokens it counts.

    ``__call__(model, batch)`` runs the model and returns ``(loss_sum, token_count, metrics)``;
    ``count_tokens(host_batch)`` gives the same count from the batch's CPU copy, read by the loop for
    the token-weighted mean before the first backward (a count read from the device would be a sync).
    """

    name: ClassVar[str] = "objective"
    batch_fields: ClassVar[tuple[str, ...]] = ("input_ids", "labels")  # fields a batch must carry
    needs_reference_model: ClassVar[bool] = False  # a frozen copy of the starting model (DPO-style objectives)
    supports_fused_head: ClassVar[bool] = False  # the fused output-head kernels (Liger, Cut Cross-Entropy)

    @abstractmethod
    def count_tokens(self, batch: Batch) -> int:
        """How many tokens this batch's loss sums over, read from host (CPU) tensors only."""

    @abstractmethod
    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput: ...

    def for_evaluation(self) -> "Objective":
        """The objective an eval loss is measured with (label smoothing off: the eval loss stays plain)."""
        return self

    def through(self, call: Callable[[Any, Batch], Any]) -> "Objective":
        """This objective run by `call` (an engine's wrapper that runs it inside DDP/FSDP/DeepSpeed's forward)."""
        return self if call is self else _CalledThrough(self, call)


@dataclass(frozen=True)
class _CalledThrough(Objective):
    inner: Objective
    call: Callable[[Any, Batch], Any]

    def count_tokens(self, batch: Batch) -> int:
        return self.inner.count_tokens(batch)

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        return self.call(model, batch)
