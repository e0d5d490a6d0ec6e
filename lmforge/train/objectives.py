"""Pretraining objectives (labels from token ids) and their metrics.

CLM convention: ``labels == input_ids`` (pad positions set to -100) and the *model* shifts:
transformers' causal-LM loss compares ``logits[:, t]`` with ``labels[:, t + 1]``. Do not shift
the labels yourself, or the model learns to predict two tokens ahead.

MLM: BERT's recipe (Devlin et al. 2019, §3.1): choose 15% of the non-special tokens;
of the chosen, 80% become the mask token, 10% a random token, 10% stay unchanged; the loss
is taken only on the chosen positions (all other labels are -100).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from lmforge.data.prepare import IGNORE_INDEX


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


class PretrainCollator:
    """Stack equal-length windows (from ``TokenWindows``) into a ``clm`` or ``mlm`` batch.

    A CLM window of ``seq_len + 1`` tokens is fed whole (``labels == input_ids``): the model's
    internal shift turns it into ``seq_len`` next-token predictions. MLM masks the whole window.
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
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, windows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack([torch.as_tensor(w, dtype=torch.long) for w in windows])
        if self.objective == "clm":
            labels = clm_labels(ids)
        else:
            ids, labels = mask_tokens(ids, self.mask_token_id, self.vocab_size, self.special_ids,
                                      self.mlm_probability, self.generator)
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
