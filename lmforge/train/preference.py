"""Preference objectives (`rl:`): DPO and its losses (sigmoid, hinge, IPO, robust; cDPO label smoothing, WPO
weighting, length normalisation, RPO), ORPO, SimPO and KTO. Each is one :class:`Objective`; the loop and
TrainingRun know nothing of them beyond `needs_reference_model`.

The formulas are TRL 1.16's (trl/trainer/dpo_trainer.py, kto_trainer.py, experimental/orpo, experimental/cpo),
checked against TRL itself by bench/preference_parity.py and tests/test_preference.py. A batch is
lmforge.data.preference's: 2B rows (B chosen, then B rejected) with labels only on the answers; a step's
loss is the mean over its pairs (count_tokens counts pairs, not tokens).

The reference model (DPO, IPO, KTO): the log-probabilities in the batch (``ref_logps``, from
precompute_ref_log_probs), else `reference` (a frozen copy, for full fine-tuning), else the policy itself with
its LoRA adapter switched off (peft's ``disable_adapter``: no second copy of the weights).

Metrics (TRL's names) are device tensors, averaged over a step's micro-batches by the loop and logged:
rewards/chosen, rewards/rejected (beta times the answers' log-ratio to the reference), rewards/margins,
rewards/accuracies (the share of pairs whose chosen reward is higher).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lmforge.data.batching import Batch
from lmforge.data.examples import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.train.loss import base_model_of, uses_fast_path
from lmforge.train.objective_base import Objective, ObjectiveOutput


@dataclass(frozen=True)
class AnswerLogps:
    """Per row: the summed log-probability of its answer tokens, their count, and (WPO) the summed log Σ p²."""

    sums: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor | None = None  # kept for the NLL terms (ORPO, SimPO's cpo_alpha, RPO)
    log_sum_sq: torch.Tensor | None = None


def answer_logps(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                 keep_logits: bool = False, weighting: bool = False) -> AnswerLogps:
    """Log-probabilities of each row's labelled tokens (the model predicts token t+1 at position t)."""
    # (a DDP/DeepSpeed wrapper (`module`) must see the forward itself: only an unwrapped model takes the fast path)
    if not keep_logits and not hasattr(model, "module") and uses_fast_path(model):
        return _labelled_logps(model, input_ids, labels, attention_mask, weighting)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    log_probs = logits.log_softmax(-1)
    token_logps = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    log_sum_sq = None
    if weighting:
        with torch.no_grad():  # WPO's weights carry no gradient (TRL computes them under no_grad too)
            log_sum_sq = (torch.logsumexp(2 * log_probs, dim=-1) * mask).sum(1)
    return AnswerLogps(token_logps.sum(1), mask.sum(1), logits if keep_logits else None, log_sum_sq)


def _labelled_logps(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                    weighting: bool) -> AnswerLogps:
    """answer_logps with the output head on the answer tokens only (loss.py's fast path): the prompt and padding
    positions, half or more of a pair's rows, never get vocabulary-sized logits, and the labelled ones get one
    fp32 copy (log p = logit - logsumexp), not a log-softmax beside the logits. Same numbers as the full path."""
    base = base_model_of(model)
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        # Right padding only (the pair collator's): under the causal mask no answer or prompt token attends to the
        # padding after it, so the padding mask changes none of the labelled positions' outputs. Without it SDPA
        # takes its causal flash kernel and keeps no [rows, heads, length, length] attention weights for backward.
        attention_mask = None
    hidden = getattr(base, base.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                                    use_cache=False).last_hidden_state
    # (row, column) of every labelled position (on a GPU, nonzero waits for the device: one sync per forward)
    rows, columns = (labels[:, 1:] != IGNORE_INDEX).nonzero().unbind(1)
    logits = base.get_output_embeddings()(hidden[rows, columns]).float()
    log_norm = logits.logsumexp(-1)
    token_logps = logits.gather(-1, labels[:, 1:][rows, columns].unsqueeze(-1)).squeeze(-1) - log_norm
    sums = token_logps.new_zeros(labels.shape[0]).index_add(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=labels.shape[0])
    log_sum_sq = None
    if weighting:
        with torch.no_grad():  # WPO's weights carry no gradient (TRL computes them under no_grad too)
            per_token = torch.logsumexp(2 * (logits - log_norm.unsqueeze(-1)), dim=-1)
            log_sum_sq = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)
    return AnswerLogps(sums, counts, None, log_sum_sq)


def _unwrapped(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP's wrapper


def reference_context(model: Any) -> contextlib.AbstractContextManager:
    """The policy with its adapter switched off: the reference of a LoRA/QLoRA run."""
    inner = _unwrapped(model)
    if not hasattr(inner, "disable_adapter"):
        raise LmforgeError("this objective needs a reference model and the policy has no adapter to switch off",
                           where="rl", fix="train with adapter: lora, or let the run hold a frozen copy (full fine-tuning)")
    return inner.disable_adapter()


@dataclass(frozen=True)
class PreferenceObjective(Objective):
    """What the pair objectives share: counting pairs, and the reference log-probabilities."""

    beta: float = 0.1
    reference: Any = field(default=None, compare=False, repr=False)  # a frozen copy (full fine-tuning)
    batch_fields: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "attention_mask")

    def count_tokens(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0]) // 2  # pairs: the loss is a mean over them

    def with_reference(self, reference: Any) -> "PreferenceObjective":
        return replace(self, reference=reference)

    @torch.no_grad()
    def reference_logps(self, model: Any, batch: Batch) -> torch.Tensor:
        """Summed answer log-probabilities under the reference model, one per row."""
        if "ref_logps" in batch:
            return batch["ref_logps"].to(torch.float32)
        args = (batch["input_ids"], batch["labels"], batch["attention_mask"])
        if self.reference is not None:
            return answer_logps(self.reference, *args).sums
        with reference_context(model):
            return answer_logps(model, *args).sums


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()}


def chosen_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of these rows (TRL's "sft"/nll term)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class DPO(PreferenceObjective):
    """DPO (Rafailov et al. 2023) with TRL's loss types, summed with their weights.

    sigmoid: -log σ(β·Δ), with cDPO's label smoothing ε: -(1-ε) log σ(βΔ) - ε log σ(-βΔ) (TRL 1.16 reads
    label_smoothing for robust only; lmforge keeps cDPO so dpo_label_smoothing acts on sigmoid too);
    hinge: relu(1 - βΔ); ipo: ((Δc/|c| - Δr/|r|) - 1/(2β))² (per-token averaged, as TRL); robust: the unbiased
    noisy-label form. Δ = (log πc - log πref,c) - (log πr - log πref,r). `normalize` (dpo_norm_loss) averages
    each answer's log-ratio over its tokens; `weighting` (dpo_use_weighting) is WPO; `rpo_alpha` adds that
    times the chosen answers' NLL.
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    label_smoothing: float = 0.0
    weighting: bool = False
    normalize: bool = False
    rpo_alpha: float | None = None
    name: ClassVar[str] = "dpo"
    needs_reference_model: ClassVar[bool] = True

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        pairs = ids.shape[0] // 2
        policy = answer_logps(model, ids, labels, mask, keep_logits=self.rpo_alpha is not None, weighting=self.weighting)
        reference = self.reference_logps(model, batch)
        ratios = policy.sums - reference
        counts = policy.counts.clamp(min=1)
        chosen_ratio, rejected_ratio = ratios[:pairs], ratios[pairs:]
        delta = chosen_ratio - rejected_ratio
        if self.normalize:
            delta = chosen_ratio / counts[:pairs] - rejected_ratio / counts[pairs:]
        beta, eps = self.beta, self.label_smoothing
        loss = torch.zeros(pairs, device=ids.device)
        for kind, weight in zip(self.loss_types, self.loss_weights):
            if kind == "sigmoid":
                per_pair = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
            elif kind == "hinge":
                per_pair = torch.relu(1 - beta * delta)
            elif kind == "ipo":
                per_pair = (chosen_ratio / counts[:pairs] - rejected_ratio / counts[pairs:] - 1 / (2 * beta)) ** 2
            elif kind == "robust":
                per_pair = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
            else:
                raise LmforgeError(f"unknown dpo_loss_type {kind}", where="dpo_loss_type", fix="use sigmoid, hinge, ipo or robust")
            if self.weighting:  # WPO, Eq. 2: the policy's own per-token-normalised probability of both answers
                weights = torch.exp((policy.sums.detach() - policy.log_sum_sq) / counts)
                per_pair = per_pair * weights[:pairs] * weights[pairs:]
            loss = loss + weight * per_pair
        if self.rpo_alpha is not None:
            loss = loss + self.rpo_alpha * chosen_nll(policy.logits[:pairs], labels[:pairs])
        metrics = _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)
        return loss.sum(), pairs, metrics


@dataclass(frozen=True)
class ORPO(PreferenceObjective):
    """ORPO (Hong et al. 2024), no reference model: NLL of the chosen rows (prompt and answer, as TRL) minus
    β·log σ(log-odds of the per-token-averaged chosen vs rejected probability); β is orpo_alpha."""

    name: ClassVar[str] = "orpo"

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        pairs = ids.shape[0] // 2
        policy = answer_logps(model, ids, labels, mask, keep_logits=True)
        average = policy.sums / policy.counts.clamp(min=1)
        chosen, rejected = average[:pairs], average[pairs:]
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        full_rows = ids[:pairs].masked_fill(mask[:pairs] == 0, IGNORE_INDEX)
        nll = chosen_nll(policy.logits[:pairs], full_rows)
        loss = nll - self.beta * ratio  # per pair; the mean over pairs is TRL's nll - mean(β·ratio)
        metrics = {**_pair_metrics(self.beta * chosen, self.beta * rejected), "nll_loss": nll.detach(),
                   "log_odds_ratio": ratio.detach().mean()}
        return loss.sum(), pairs, metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (TRL's branch)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass(frozen=True)
class SimPO(PreferenceObjective):
    """SimPO (Meng et al. 2024), no reference: -log σ(β·(avg log πc - avg log πr) - γ), plus cpo_alpha times the
    chosen answers' NLL (TRL's CPOTrainer with loss_type simpo)."""

    gamma: float = 0.5
    cpo_alpha: float = 0.0
    name: ClassVar[str] = "simpo"

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        pairs = ids.shape[0] // 2
        policy = answer_logps(model, ids, labels, mask, keep_logits=self.cpo_alpha != 0)
        average = policy.sums / policy.counts.clamp(min=1)
        chosen, rejected = average[:pairs], average[pairs:]
        loss = -F.logsigmoid(self.beta * (chosen - rejected - self.gamma / self.beta))
        if self.cpo_alpha:
            loss = loss + self.cpo_alpha * chosen_nll(policy.logits[:pairs], labels[:pairs])
        return loss.sum(), pairs, _pair_metrics(self.beta * chosen, self.beta * rejected)


@dataclass(frozen=True)
class KTO(PreferenceObjective):
    """KTO (Ethayarajh et al. 2024): desirable rows pay 1 - σ(β(ratio - KL)), undesirable 1 - σ(β(KL - ratio)),
    weighted by kto_desirable_weight / kto_undesirable_weight; KL is the batch's mismatched rows' (each prompt
    with the previous answer) mean log-ratio, detached and clamped at 0, as TRL's."""

    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    name: ClassVar[str] = "kto"
    needs_reference_model: ClassVar[bool] = True

    def count_tokens(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])  # rows

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        kl_args = (batch["kl_input_ids"], batch["kl_labels"], batch["kl_attention_mask"])
        with torch.no_grad():
            kl_policy = answer_logps(model, *kl_args).sums
        policy = answer_logps(model, ids, labels, mask).sums
        # (precompute_ref_log_probs is refused for KTO: its KL rows depend on how the batch is cut)
        with torch.no_grad(), (contextlib.nullcontext() if self.reference is not None else reference_context(model)):
            ref_model = self.reference if self.reference is not None else model
            reference = answer_logps(ref_model, ids, labels, mask).sums
            kl_reference = answer_logps(ref_model, *kl_args).sums
        kl = (kl_policy - kl_reference).mean().detach().clamp(min=0)
        ratio = policy - reference
        desirable = batch["desirable"].to(ids.device)
        good = 1 - torch.sigmoid(self.beta * (ratio - kl))
        bad = 1 - torch.sigmoid(self.beta * (kl - ratio))
        loss = torch.where(desirable, self.desirable_weight * good, self.undesirable_weight * bad)
        rewards = (self.beta * ratio).detach()
        d = desirable.float()
        metrics = {"kl": kl, "rewards/chosen": (rewards * d).sum() / d.sum().clamp(min=1),
                   "rewards/rejected": (rewards * (1 - d)).sum() / (1 - d).sum().clamp(min=1)}
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return loss.sum(), int(ids.shape[0]), metrics


@dataclass(frozen=True)
class RewardModel(PreferenceObjective):
    """A reward model's Bradley-Terry loss (TRL's RewardTrainer): -log σ(r(chosen) - r(rejected)), r the score a
    sequence-classification head gives each row at its last token. rewards/accuracies is the held-out pairwise
    accuracy (the share of pairs whose chosen answer scores higher). center_rewards_coefficient adds
    coef * (r(chosen) + r(rejected))^2 per pair (TRL's auxiliary loss), which keeps the scores near mean zero."""

    name: ClassVar[str] = "reward_model"
    center_rewards_coefficient: float | None = None

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pairs = ids.shape[0] // 2
        scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
        chosen, rejected = scores[:pairs], scores[pairs:]
        loss = -F.logsigmoid(chosen - rejected)
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * (chosen + rejected) ** 2
        return loss.sum(), pairs, _pair_metrics(chosen, rejected)


def preference_objective(rl: Any) -> PreferenceObjective:
    """The objective of a config's `rl:` section (axolotl's keys; defaults are TRL's)."""
    if rl.reward_model:
        return RewardModel(center_rewards_coefficient=rl.center_rewards_coefficient)
    beta = rl.rl_beta if rl.rl_beta is not None else 0.1
    if rl.rl in ("dpo", "ipo"):
        types = tuple(rl.dpo_loss_type or (["ipo"] if rl.rl == "ipo" else ["sigmoid"]))
        weights = tuple(rl.dpo_loss_weights or [1.0] * len(types))
        return DPO(beta=beta, loss_types=types, loss_weights=weights, label_smoothing=rl.dpo_label_smoothing,
                   weighting=rl.dpo_use_weighting, normalize=rl.dpo_norm_loss, rpo_alpha=rl.rpo_alpha)
    if rl.rl == "orpo":
        return ORPO(beta=rl.orpo_alpha)  # TRL maps orpo_alpha onto ORPOConfig.beta
    if rl.rl == "simpo":
        return SimPO(beta=beta, gamma=rl.simpo_gamma, cpo_alpha=rl.cpo_alpha)
    if rl.rl == "kto":
        return KTO(beta=beta, desirable_weight=rl.kto_desirable_weight, undesirable_weight=rl.kto_undesirable_weight)
    raise LmforgeError(f"rl: {rl.rl} is not a preference method", where="rl", fix="use dpo, ipo, orpo, simpo or kto")


@torch.no_grad()
def precompute_reference(model: Any, examples: list[Any], collate: Any, batch_size: int, device: torch.device) -> None:
    """precompute_ref_log_probs: each example's reference log-probabilities, computed once (the policy before any
    update, adapter off when it has one) and stored on it; batches then carry them as ``ref_logps``."""
    was_training = model.training
    model.eval()
    context = _unwrapped(model).disable_adapter() if hasattr(_unwrapped(model), "disable_adapter") else contextlib.nullcontext()
    with context:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, 0).items() if isinstance(v, torch.Tensor)}
            sums = answer_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"]).sums.double().cpu().tolist()
            for i, example in enumerate(chunk):
                example.ref_logps = (sums[i], sums[len(chunk) + i])
    model.train(was_training)
