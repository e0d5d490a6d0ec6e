"""GRPO's objective: the clipped policy-gradient loss on sampled completions, with a KL term to the reference.

Shao et al. 2024 (DeepSeekMath, §4.1), as TRL's GRPOTrainer computes it (``_compute_loss``): for each completion
token, the probability ratio r = π(t) / π_old(t) of the policy now to the policy that sampled it, and the loss

    -min(r·A, clip(r, 1-ε, 1+ε_high)·A) + β·KL,   KL = exp(ref - logp) - (ref - logp) - 1  (k3, Schulman 2020)

where A is the completion's group-normalised advantage (lmforge.train.rollouts). With one optimizer step per
generation (num_iterations 1), π_old is the policy itself (detached), r = 1 and only the gradient of r·A acts.

``loss_type`` says what the per-token losses are averaged over; each is a sum over this micro-batch plus a
count the loop divides the step's sum by, so gradient accumulation gives what TRL gives:
- dapo (TRL's default): the step's completion tokens (count: tokens);
- grpo: each completion's token mean, then the mean over completions (count: completions);
- bnpo: the micro-batch's token mean, averaged over micro-batches (count: 1 per micro-batch);
- dr_grpo: completions x max_completion_length (count: that product).

Log-probabilities come from logits divided by the sampling temperature, as TRL does, and positions follow
the attention mask (left-padded prompts), as generation assigned them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lmforge.data.batching import Batch, host_batch
from lmforge.train.objective_base import Objective, ObjectiveOutput


class MetricSums:
    """Named sums and counts kept on the device while training (no sync), read back as means at logging time."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}

    def add(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float) -> None:
        old = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (old[0] + (total.detach() if isinstance(total, torch.Tensor) else total),
                           old[1] + (count.detach() if isinstance(count, torch.Tensor) else count))

    def drain(self, sum_over_ranks: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
        """The means since the last drain; with `sum_over_ranks` (several ranks), of every rank's sums and counts."""
        names = sorted(self.sums)  # the same names on every rank: each generation and step records them alike
        values = [float(self.sums[n][0]) for n in names] + [float(self.sums[n][1]) for n in names]
        if sum_over_ranks is not None and names:
            values = sum_over_ranks(values)
        self.sums = {}
        return {name: values[i] / max(values[len(names) + i], 1e-12) for i, name in enumerate(names)}


@contextlib.contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """The output head (lm_head) reads a contiguous input while inside.

    transformers keeps the last positions of the hidden states as a strided view (``hidden[:, -k:, :]``), and
    torch's matmul cannot fold a [rows, k, d] view whose rows are not adjacent into one GEMM: it expands the
    [vocab, d] head weight to [rows, d, vocab] and runs a bmm. That copy (8 rows x 49152 x 576 in bf16: 450 MB,
    1.4 s on one core of this CPU, a quarter of one GRPO sampling) is paid by every prefill of ``generate`` and
    by every forward that keeps the completion's logits, and is kept for backward. A contiguous copy of the few
    kept positions (rows x k x d) makes it one GEMM; the result is the same matmul.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        yield
        return

    def contiguous(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    handle = head.register_forward_pre_hook(contiguous, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def _checkpointing(model: Any) -> bool:
    """Gradient checkpointing active: transformers then drops the KV cache in training (use_cache is turned off)."""
    return bool(model.training) and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _shared_prompt_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          position_ids: torch.Tensor, width: int) -> torch.Tensor | None:
    """The logits of the last width + 1 positions, each distinct prompt's prefix run once (None: no saving, or the
    model keeps no cache, and the caller runs the plain forward).

    A GRPO micro-batch holds num_generations completions of each prompt, and the prompt is most of each row
    (GSM8K: ~100 prompt tokens, 32 completion tokens). Causal attention makes a prompt's keys and values the same
    in every row that holds it, so the prefix (every prompt column but the last) goes through the model once per
    distinct prompt, its KV cache is gathered out to the rows (an index, differentiable: the gradients of the
    rows' shares add up in the one prefix pass), and only the last prompt token and the completion run per row.
    The same sums in a different batch shape: equal to the plain forward up to float rounding.
    """
    prefix = input_ids.shape[1] - width - 1
    if prefix < 1 or _checkpointing(model):
        return None
    key = torch.cat([input_ids[:, :prefix], attention_mask[:, :prefix].to(input_ids.dtype)], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == input_ids.shape[0]:
        return None
    first = torch.full((distinct.shape[0],), input_ids.shape[0], dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, torch.arange(input_ids.shape[0], device=inverse.device), "amin")
    cache = model(input_ids=input_ids[first, :prefix], attention_mask=attention_mask[first, :prefix],
                  position_ids=position_ids[first, :prefix], use_cache=True, logits_to_keep=1).cache
    if cache is None or not hasattr(cache, "batch_select_indices") or cache.get_seq_length() != prefix:
        return None
    cache.batch_select_indices(inverse)
    return model(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, position_ids=position_ids[:, prefix:],
                 cache=cache, use_cache=True, logits_to_keep=width + 1).logits


def completion_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int,
                     temperature: float, share_prompts: bool = False) -> torch.Tensor:
    """log π(token) of the last `width` tokens of each row [rows, width], from logits / temperature.

    Only the completion's logits are computed (logits_to_keep), in fp32; logsumexp saves the full log-softmax copy.
    `share_prompts`: rows with the same prompt run its prefix once (:func:`_shared_prompt_logits`).
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: as generate numbered them
    with contiguous_head_input(model):
        logits = _shared_prompt_logits(model, input_ids, attention_mask, position_ids, width) if share_prompts else None
        if logits is None:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           logits_to_keep=width + 1, use_cache=False).logits
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, -width:]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


@dataclass(frozen=True)
class GRPO(Objective):
    """GRPO's loss on a micro-batch of completions (fields made by lmforge.train.rollouts.RolloutStream)."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    max_completion_length: int = 512
    temperature: float = 1.0
    use_bias_correction_kl: bool = False
    skip_zero_advantage: bool = False
    share_prompts: bool = False  # a prompt's prefix once per micro-batch (completion_logps); off where ranks shard the model
    metrics: MetricSums = field(default_factory=MetricSums, compare=False)
    name: ClassVar[str] = "grpo"
    batch_fields: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "completion_mask", "advantages")

    @classmethod
    def from_settings(cls, trl: Any, skip_zero_advantage: bool, share_prompts: bool = False) -> "GRPO":
        """From the config's trl: block (TrlSettings)."""
        return cls(beta=trl.beta, epsilon_low=trl.epsilon,
                   epsilon_high=trl.epsilon if trl.epsilon_high is None else trl.epsilon_high,
                   loss_type=trl.loss_type, importance_sampling_level=trl.importance_sampling_level,
                   max_completion_length=trl.max_completion_length, temperature=trl.temperature,
                   use_bias_correction_kl=trl.use_bias_correction_kl, skip_zero_advantage=skip_zero_advantage,
                   share_prompts=share_prompts)

    def count_tokens(self, batch: Batch) -> int:
        mask = batch["completion_mask"]
        if self.loss_type == "grpo":
            return int(mask.shape[0])
        if self.loss_type == "bnpo":
            return 1
        if self.loss_type == "dr_grpo":
            return int(mask.shape[0]) * self.max_completion_length
        return int(mask.sum())

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        host = host_batch(batch)
        mask = batch["completion_mask"].float()
        count = self.count_tokens(host)
        if self.skip_zero_advantage and not bool(host["advantages"].any()):
            # No learning signal (every completion in these groups scored the same): no forward, no gradient.
            self.metrics.add("skipped_zero_adv_batches", 1.0, 1.0)
            return torch.zeros((), device=mask.device, requires_grad=True), count, {}
        if self.skip_zero_advantage:
            self.metrics.add("skipped_zero_adv_batches", 0.0, 1.0)
        logps = completion_logps(model, batch["input_ids"], batch["attention_mask"], mask.shape[1], self.temperature,
                                 self.share_prompts)
        advantages = batch["advantages"].float().unsqueeze(1)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        log_ratio = logps - old
        if self.importance_sampling_level == "sequence":  # GSPO: one ratio per completion, its tokens' mean
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        tokens = mask.sum()
        if self.beta != 0.0:
            ref = batch["ref_logps"]
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            if self.use_bias_correction_kl:
                kl = kl * ratio
            per_token = per_token + self.beta * kl
            self.metrics.add("kl", (kl * mask).sum(), tokens)
        if self.loss_type == "grpo":
            loss_sum = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
        elif self.loss_type == "bnpo":
            loss_sum = (per_token * mask).sum() / tokens.clamp(min=1.0)
        else:  # dapo, dr_grpo: a plain sum, divided by the count
            loss_sum = (per_token * mask).sum()
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float() * mask
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float() * mask
        self.metrics.add("clip_ratio/low_mean", low.sum(), tokens)
        self.metrics.add("clip_ratio/high_mean", high.sum(), tokens)
        self.metrics.add("clip_ratio/region_mean", (low + high).sum(), tokens)
        return loss_sum, count, {}
