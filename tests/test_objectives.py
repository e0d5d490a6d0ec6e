"""Pretraining objectives: BERT masking statistics, the CLM label convention, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.train.objectives import (
    IGNORE_INDEX,
    PretrainCollator,
    clm_labels,
    mask_tokens,
    masked_token_accuracy,
    masked_token_counts,
    perplexity,
    shifted_clm_loss,
)

VOCAB = 1000
PAD, BOS, EOS, MASK = 0, 2, 3, 4
SPECIAL = [PAD, 1, BOS, EOS, MASK]


def _batch(n_rows: int = 200, n_cols: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n_rows, n_cols), generator=g)
    ids[:, 0] = BOS
    ids[:, -1] = EOS
    ids[:, -50:-1] = PAD  # a padded tail: must never be chosen
    return ids


def test_mask_statistics_match_bert_recipe() -> None:
    ids = _batch()
    inputs, labels = mask_tokens(ids, MASK, VOCAB, SPECIAL, 0.15, torch.Generator().manual_seed(1))
    eligible = ~torch.isin(ids, torch.tensor(SPECIAL))
    chosen = labels != IGNORE_INDEX
    n_chosen = int(chosen.sum())
    assert n_chosen > 20_000  # enough tokens for ±1% to be a meaningful bound
    assert abs(n_chosen / int(eligible.sum()) - 0.15) < 0.01
    # Special tokens (bos, eos, pad) are never chosen, and keep their ids in the inputs.
    assert not (chosen & ~eligible).any()
    assert torch.equal(inputs[~eligible], ids[~eligible])
    # Labels hold the original token at chosen positions only.
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs == MASK) & chosen
    unchanged = (inputs == ids) & chosen
    randomized = chosen & ~masked & ~unchanged
    assert abs(int(masked.sum()) / n_chosen - 0.80) < 0.01
    # A random draw equal to the original (p = 1/995) counts as unchanged: a tiny bias, well inside 1%.
    assert abs(int(unchanged.sum()) / n_chosen - 0.10) < 0.01
    assert abs(int(randomized.sum()) / n_chosen - 0.10) < 0.01
    # Random replacements are ordinary tokens, never pad/bos/eos/mask.
    assert not torch.isin(inputs[randomized], torch.tensor(SPECIAL)).any()
    assert inputs[randomized].max() < VOCAB


def test_mask_is_deterministic_and_leaves_input_alone() -> None:
    ids = _batch(10, 200)
    before = ids.clone()
    a = mask_tokens(ids, MASK, VOCAB, SPECIAL, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, MASK, VOCAB, SPECIAL, generator=torch.Generator().manual_seed(7))
    c = mask_tokens(ids, MASK, VOCAB, SPECIAL, generator=torch.Generator().manual_seed(8))
    assert torch.equal(ids, before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_probability_is_validated() -> None:
    with pytest.raises(ValueError):
        mask_tokens(_batch(2, 10), MASK, VOCAB, SPECIAL, mlm_probability=0.0)


def test_clm_labels_are_inputs_and_model_shifts_by_one() -> None:
    from lmforge.models.build import build_model

    model = build_model("llama", VOCAB, "tiny", seed=0).eval()
    ids = torch.randint(5, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = clm_labels(ids)
    assert torch.equal(labels, ids)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    logits = out.logits.float()
    # Position t predicts token t+1: the model's loss is CE(logits[:, :-1], ids[:, 1:]).
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    unshifted = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert torch.allclose(shifted_clm_loss(logits, labels), manual, atol=1e-6)
    assert not torch.allclose(out.loss, unshifted, atol=1e-3)


def test_clm_labels_ignore_pad() -> None:
    ids = torch.tensor([[BOS, 7, 8, EOS, PAD, PAD]])
    assert clm_labels(ids, pad_token_id=PAD).tolist() == [[BOS, 7, 8, EOS, IGNORE_INDEX, IGNORE_INDEX]]


def test_metrics() -> None:
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(1e6) == float("inf")
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 0] = logits[0, 3, 4] = 1.0
    labels = torch.tensor([[1, 3, IGNORE_INDEX, 4]])  # right, wrong, ignored, right
    assert masked_token_counts(logits, labels) == (2, 3)
    assert masked_token_accuracy(logits, labels) == pytest.approx(2 / 3)
    assert math.isnan(masked_token_accuracy(logits, torch.full((1, 4), IGNORE_INDEX)))


def test_collator() -> None:
    windows = [torch.arange(5, 14), torch.arange(20, 29)]
    clm = PretrainCollator("clm")(windows)
    assert clm["input_ids"].shape == (2, 9) and torch.equal(clm["labels"], clm["input_ids"])
    mlm = PretrainCollator("mlm", mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, mlm_probability=0.5)(
        [torch.randint(5, VOCAB, (256,)) for _ in range(4)]
    )
    assert ((mlm["labels"] != IGNORE_INDEX).float().mean() - 0.5).abs() < 0.1
