"""Training objectives: one class each, the loop's only view of what is being learned, and their helpers.

An :class:`Objective` turns a batch into ``(loss_sum, token_count, metrics)`` and counts, from the
batch's host copy, the tokens its loss sums over (the loop weighs gradient accumulation by that count
before the first backward, so it must come without a device sync). It declares the batch fields it
reads and whether it needs a second model (a frozen reference, as DPO-style objectives do). A new
training method is a new class here plus its config rows in :func:`objective_from_config`; the loop
and `TrainingRun` stay as they are.

CLM convention: ``labels == input_ids`` (pad positions set to -100) and the *model* shifts:
transformers' causal-LM loss compares ``logits[:, t]`` with ``labels[:, t + 1]``. Do not shift
the labels yourself, or the model learns to predict two tokens ahead.

MLM: BERT's recipe (Devlin et al. 2019, §3.1): choose 15% of the non-special tokens;
of the chosen, 80% become the mask token, 10% a random token, 10% stay unchanged; the loss
is taken only on the chosen positions (all other labels are -100).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.batching import Batch, host_batch, segment_boundaries
from lmforge.data.prepare import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.train.loss import causal_lm_loss
from lmforge.train.objective_base import Objective, ObjectiveOutput

def next_token_count(batch: Batch) -> int:
    """Labelled next-token predictions of a causal-LM batch: labels from position 1 on (the model shifts)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class CausalLM(Objective):
    """Next-token cross-entropy over the labelled positions (instruction tuning, pretraining, continued pretraining).

    `label_smoothing` (config label_smoothing_factor), `loss_chunks` (chunked_cross_entropy) and `fused`
    (the Liger / Cut Cross-Entropy kernels) choose how :func:`lmforge.train.loss.causal_lm_loss` computes it.
    """

    label_smoothing: float = 0.0
    loss_chunks: int = 1
    fused: str | None = None
    name: ClassVar[str] = "clm"
    supports_fused_head: ClassVar[bool] = True

    def count_tokens(self, batch: Batch) -> int:
        return next_token_count(batch)

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        options: dict[str, Any] = {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}
        if self.loss_chunks > 1:
            options["loss_chunks"] = self.loss_chunks
        if self.fused:
            options["fused"] = self.fused
        loss_sum, count = causal_lm_loss(model, batch, **options)
        return loss_sum, count, {}

    def for_evaluation(self) -> "CausalLM":
        return replace(self, label_smoothing=0.0) if self.label_smoothing else self


def top_k_entropy_weights(logits: torch.Tensor, alpha: float, top_k: int) -> torch.Tensor:
    """EAFT's token weights: the entropy of the softmax over each position's `top_k` largest logits, to the
    power `alpha`. The top-k entropy (at most ln k) stands in for the full-vocabulary one at a k-wide cost."""
    top = torch.topk(logits.float(), k=min(top_k, logits.size(-1)), dim=-1).values
    log_probs = F.log_softmax(top, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return entropy.pow(alpha)


@dataclass(frozen=True)
class EntropyAwareFocal(CausalLM):
    """Entropy-aware focal training (config use_eaft; axolotl's `use_eaft`, after LlamaFactory-EAFT): each
    labelled token's cross-entropy is weighted by :func:`top_k_entropy_weights` of the model's own prediction
    there, so tokens the model is already sure of (low entropy) pull less than uncertain ones. The weights
    carry no gradient, and the sum stays over the same token count, as axolotl's loss divides by the token count.

    Evaluation measures plain cross-entropy, so an EAFT run's eval loss compares with an SFT run's.
    """

    alpha: float = 1.0
    top_k: int = 20
    name: ClassVar[str] = "eaft"
    supports_fused_head: ClassVar[bool] = False  # the weights need the labelled logits a fused head never builds

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        weights = partial(top_k_entropy_weights, alpha=self.alpha, top_k=self.top_k)
        loss_sum, count = causal_lm_loss(model, batch, label_smoothing=self.label_smoothing, token_weights=weights)
        return loss_sum, count, {}

    def for_evaluation(self) -> CausalLM:
        return CausalLM()


# Batch fields a causal LM reads itself; an image-text batch's other tensors (pixel_values, image_sizes,
# image_grid_thw, pixel_attention_mask) are the images', passed to the model as they are.
TEXT_BATCH_FIELDS = ("input_ids", "labels", "attention_mask", "position_ids", "cu_seq_lens")


@dataclass(frozen=True)
class ImageTextCLM(CausalLM):
    """Causal LM with pixel inputs (image-text models): next-token cross-entropy over the labelled text positions,
    the model given the batch's images beside its tokens. Image tokens never carry labels (lmforge.data.images)."""

    name: ClassVar[str] = "image_text_clm"
    batch_fields: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "attention_mask", "pixel_values")
    supports_fused_head: ClassVar[bool] = False  # the head runs inside the model's own forward

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        labels, host = batch["labels"], host_batch(batch)
        rows, columns = _labelled_positions(labels[:, 1:], host["labels"][:, 1:])
        images = {k: v for k, v in batch.items() if k not in TEXT_BATCH_FIELDS and isinstance(v, torch.Tensor)}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                       **images).logits[rows, columns]
        loss_sum = F.cross_entropy(logits.float(), labels[:, 1:][rows, columns], reduction="sum",
                                   label_smoothing=self.label_smoothing)
        return loss_sum, int(rows.shape[0]), {}


@dataclass(frozen=True)
class LossFunction(Objective):
    """A bare ``(model, batch) -> (loss_sum, count)`` function taken as a causal-LM objective (counted like
    :class:`CausalLM`): how tests and benchmarks hand the loop a loss of their own."""

    fn: Callable[[Any, Batch], tuple[torch.Tensor, int]]

    def count_tokens(self, batch: Batch) -> int:
        return next_token_count(batch)

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        loss_sum, count = self.fn(model, batch)[:2]
        return loss_sum, count, {}


def as_objective(loss: Objective | Callable[[Any, Batch], Any]) -> Objective:
    return loss if isinstance(loss, Objective) else LossFunction(loss)


def _labelled_positions(labels: torch.Tensor, host_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the labelled positions, found on the host and sent as integer indices: gathering
    with them needs no sync, where boolean-mask indexing of a device tensor waits for the device to count it."""
    positions = (host_labels != IGNORE_INDEX).nonzero()
    if labels.device.type == "cuda":
        positions = positions.pin_memory()  # so the copy is truly asynchronous
    rows, columns = positions.to(labels.device, non_blocking=True).unbind(1)
    return rows, columns


@dataclass(frozen=True)
class MaskedLM(Objective):
    """BERT's masked-token cross-entropy over the chosen positions only (labels -100 elsewhere; no shift).

    The masking itself happens in the collator (:func:`mask_tokens`, :class:`PretrainCollator`), so that a
    resumed run draws the same masks from the data position.
    """

    label_smoothing: float = 0.0
    name: ClassVar[str] = "mlm"
    batch_fields: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "attention_mask")

    def count_tokens(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: Any, batch: Batch) -> ObjectiveOutput:
        labels, host = batch["labels"], host_batch(batch)
        rows, columns = _labelled_positions(labels, host["labels"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[rows, columns]
        loss_sum = F.cross_entropy(logits.float(), labels[rows, columns], reduction="sum", label_smoothing=self.label_smoothing)
        return loss_sum, int(rows.shape[0]), {}

    def for_evaluation(self) -> "MaskedLM":
        return replace(self, label_smoothing=0.0) if self.label_smoothing else self


def objective_from_config(cfg: Any) -> Objective:
    """The objective a config trains: causal LM, or masked LM for ``objective: mlm`` pretraining, with
    label_smoothing_factor and chunked_cross_entropy (the fused head depends on the device: TrainingRun adds it)."""
    t = cfg.training
    if getattr(cfg, "rl", None) is not None and (cfg.rl.rl in ("dpo", "ipo", "orpo", "simpo", "kto") or cfg.rl.reward_model):
        from lmforge.train.preference import preference_objective  # it builds on this module

        return preference_objective(cfg.rl)
    if cfg.is_pretraining and cfg.pretrain.objective == "mlm":
        return MaskedLM(label_smoothing=t.label_smoothing_factor)
    if cfg.model.processor_type:
        return ImageTextCLM(label_smoothing=t.label_smoothing_factor)
    if t.use_eaft:
        return EntropyAwareFocal(label_smoothing=t.label_smoothing_factor, alpha=t.eaft_alpha, top_k=t.eaft_k)
    chunks = t.chunked_cross_entropy_num_chunks if t.chunked_cross_entropy else 1
    return CausalLM(label_smoothing=t.label_smoothing_factor, loss_chunks=chunks)


def clm_labels(input_ids: torch.Tensor, pad_token_id: int | None = None) -> torch.Tensor:
    """Labels for causal LM training: a copy of the inputs, pads ignored (the model shifts).

    When pad and eos share an id, pass ``pad_token_id=None`` and mask with the attention
    mask instead, or eos stops being learned.
    """
    labels = input_ids.clone()
    if pad_token_id is not None:
        labels[input_ids == pad_token_id] = IGNORE_INDEX
    return labels


def shifted_clm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, spelling out the shift transformers does internally."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def mask_tokens(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int] = (),
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking. Returns ``(masked_inputs, labels)``; ``input_ids`` is not modified.

    Special ids (pad, bos, eos, cls, sep, mask…) are never chosen and never drawn as the
    random replacement, so a pad can't leak into the middle of a sequence. Each token is
    chosen independently with ``mlm_probability`` (like transformers'
    ``DataCollatorForLanguageModeling``), so a sequence's count varies around the mean.
    """
    if not 0 < mlm_probability < 1:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    special = torch.tensor(sorted({int(i) for i in special_ids} | {int(mask_token_id)}), dtype=torch.long)
    device = input_ids.device
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def rand(shape: torch.Size) -> torch.Tensor:
        # Draw on the generator's device so a CPU generator works with CUDA inputs.
        return torch.rand(shape, generator=generator, device=gen_device).to(device)

    labels = input_ids.clone()
    eligible = ~torch.isin(input_ids, special.to(device))
    chosen = (rand(input_ids.shape) < mlm_probability) & eligible
    labels[~chosen] = IGNORE_INDEX

    inputs = input_ids.clone()
    action = rand(input_ids.shape)
    to_mask = chosen & (action < mask_fraction)
    to_random = chosen & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    inputs[to_mask] = mask_token_id

    n_random = int(to_random.sum())
    if n_random:
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[special[special < vocab_size]] = False
        pool = allowed.nonzero().squeeze(1)
        picks = torch.randint(len(pool), (n_random,), generator=generator, device=gen_device).cpu()
        inputs[to_random] = pool[picks].to(device=device, dtype=inputs.dtype)
    return inputs, labels


def perplexity(loss: float) -> float:
    """``exp(mean cross-entropy in nats)``; ``inf`` instead of an overflow error."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def masked_token_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """``(correct, total)`` over positions whose label is not -100: sum these across batches."""
    keep = labels != IGNORE_INDEX
    correct = (logits.argmax(-1)[keep] == labels[keep]).sum()
    return int(correct), int(keep.sum())


def masked_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy on the masked (labelled) positions; ``nan`` when there are none."""
    correct, total = masked_token_counts(logits, labels)
    return correct / total if total else float("nan")


def _batch_seed(seed: int, epoch: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, start]).generate_state(1)[0])


class PretrainCollator:
    """Stack equal-length windows (from ``TokenWindows``) into a ``clm`` or ``mlm`` batch.

    A CLM window of ``seq_len + 1`` tokens is fed whole (``labels == input_ids``): the model's
    internal shift turns it into ``seq_len`` next-token predictions. MLM masks the window's first
    ``seq_len`` tokens (all of it without a `seq_len`); every masked position is a target.

    Called with a `key` (epoch, first window), MLM masks are drawn from a generator seeded by it, so the
    masks of a batch are a pure function of the seed and the data position, and a resumed run draws the
    same ones. Without a key (the fixed eval batches) the generator runs on.
    """

    def __init__(
        self,
        objective: str = "clm",
        *,
        mask_token_id: int | None = None,
        vocab_size: int | None = None,
        special_ids: Sequence[int] = (),
        mlm_probability: float = 0.15,
        seed: int = 0,
        seq_len: int | None = None,
        document_end_id: int | None = None,
    ) -> None:
        if objective not in ("clm", "mlm"):
            raise ValueError(f"objective must be clm or mlm, got {objective}")
        if objective == "mlm" and (mask_token_id is None or vocab_size is None):
            raise ValueError("mlm needs mask_token_id and vocab_size")
        self.objective = objective
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.special_ids = list(special_ids)
        self.mlm_probability = mlm_probability
        self.seed, self.seq_len = seed, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        # pretrain_multipack_attn: documents in a window kept apart, each starting after this token (clm)
        self.document_end_id = document_end_id

    def __call__(self, windows: Sequence[torch.Tensor], key: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        ids = torch.stack([torch.as_tensor(w, dtype=torch.long) for w in windows])
        if self.objective == "clm":
            labels = clm_labels(ids)
            if self.document_end_id is not None:
                return document_segments(ids, labels, self.document_end_id)
        else:
            if key is not None:
                self.generator.manual_seed(_batch_seed(self.seed, *key))
            ids, labels = mask_tokens(ids[:, : self.seq_len], self.mask_token_id, self.vocab_size, self.special_ids,
                                      self.mlm_probability, self.generator)
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def document_segments(ids: torch.Tensor, labels: torch.Tensor, document_end_id: int) -> dict[str, torch.Tensor]:
    """A clm batch whose windows hold several documents, kept apart as sample_packing keeps examples apart: position
    ids restart after every end-of-text token (transformers then builds a block-diagonal causal mask; flash kernels
    get the segments as cu_seq_lens), and a document's first token is no target of the one before it."""
    columns = torch.arange(ids.shape[1]).expand_as(ids)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = ids[:, :-1] == document_end_id
    position_ids = columns - torch.where(starts, columns, 0).cummax(dim=1).values
    labels = labels.clone()
    labels[starts & (columns > 0)] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "position_ids": position_ids,
            "cu_seq_lens": segment_boundaries(position_ids)}


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the tokens' own frequency distribution: the best loss any model
    that ignores context could reach on them, even one fitted to these very tokens."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def mlm_metrics(model: Any, batches: list[Batch], device: torch.device, majority_id: int) -> dict[str, float]:
    """Masked-token loss and accuracy, and the accuracy of always guessing `majority_id`."""
    model.eval()
    loss_sum, correct, total, majority = 0.0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX
        loss_sum += float(F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"))
        c, n = masked_token_counts(logits, labels)
        correct, total = correct + c, total + n
        majority += int((labels[keep] == majority_id).sum())
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1),
            "majority_accuracy": majority / max(total, 1), "masked_tokens": total}
