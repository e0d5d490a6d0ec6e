"""Objectives: BERT masking statistics, the CLM label convention, metrics, and the objective seam of the run."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, write_config
from lmforge.config import load_config
from lmforge.train.objectives import (
    IGNORE_INDEX,
    CausalLM,
    MaskedLM,
    Objective,
    PretrainCollator,
    objective_from_config,
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
    from lmforge.models.build import build_config, build_model

    model = build_model(build_config("llama", VOCAB, "tiny"), seed=0).eval()
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


# ----------------------------------------------------------------------------- the objective seam


class _WeightedCausalLM(Objective):
    """TEST-ONLY: next-token cross-entropy with an integer weight per target token id (0 = not learned).

    It lives in this test file only, and trains through TrainingRun with no change to the loop or a recipe.
    """

    name = "weighted_clm"

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.seen: list[tuple[float, int]] = []  # (loss_sum, count) of every training micro-batch, in order

    def _target_weights(self, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        return self.weights[targets.clamp(min=0)] * (targets != IGNORE_INDEX)

    def count_tokens(self, batch: dict) -> int:
        return int(self._target_weights(batch["labels"]).sum())

    def __call__(self, model, batch):  # noqa: ANN001, ANN204
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="none")
        loss_sum = (per_token * self._target_weights(batch["labels"]).reshape(-1)).sum()
        count = self.count_tokens(batch)
        if model.training:
            self.seen.append((float(loss_sum.detach()), count))
        return loss_sum, count, {}


@pytest.mark.learning
def test_a_test_only_objective_trains_through_the_run(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    """Answer digits weigh 2, other answer words 1, the rest 0: the loop divides each step by the objective's
    count (not the labelled-token count it used to hard-code), and the weighted loss falls."""
    from lmforge.data.prepare import prepare
    from lmforge.models.load import config_tokenizer
    from lmforge.recipes.run import TrainingRun
    from lmforge.train.stream import EpochStream

    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", adapter=None, max_steps=12,
                         gradient_accumulation_steps=2, learning_rate=0.01, save_strategy="no")
    cfg = load_config(str(write_config(tmp_path / "c.yml", config)))
    with TrainingRun(cfg, "train") as run:
        tokenizer = config_tokenizer(cfg)
        data = prepare(cfg.data, tokenizer, cfg.training.seed)
        weights = torch.ones(len(tokenizer), dtype=torch.long)
        weights[[tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]] = 2
        weights[tokenizer.all_special_ids] = 0
        weights[tokenizer.convert_tokens_to_ids("plus")] = 0
        objective = _WeightedCausalLM(weights)
        model = run.model(tokenizer)
        stream = EpochStream(data.train, cfg.training.micro_batch_size, tokenizer.pad_token_id, cfg.training.seed, False)
        outcome = run.train(model, tokenizer, stream, run.count_steps(len(data.train)), objective=objective, invariants={})
    history = [loss for _, loss in outcome.result.train_history]
    assert len(history) == 12 and len(objective.seen) == 24
    for step, loss in enumerate(history):  # each step: its two micro-batches' sums over their weights
        (a, n), (b, m) = objective.seen[2 * step: 2 * step + 2]
        assert loss == pytest.approx((a + b) / (n + m), rel=1e-5)
    assert history[-1] < 0.75 * history[0]  # ~0.49 measured (AVX512 and AVX2)


def test_label_smoothing_works_in_pretraining(tiny_lora_model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """label_smoothing_factor smooths pretraining's training loss (it was accepted and silently ignored there):
    step 1's loss is the smoothed cross-entropy of its two micro-batches under the starting weights."""
    import random

    import lmforge.recipes.run as training
    from conftest import WORDS
    from lmforge.recipes.pretrain import run_pretrain
    from lmforge.train.loop import train_loop
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(200)), encoding="utf-8")
    seen: list[dict] = []

    def recording_loop(model, optimizer, scheduler, micro_batches, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        def tee():  # noqa: ANN202
            for batch in micro_batches:
                seen.append(batch)
                yield batch
        return train_loop(model, optimizer, scheduler, tee(), *args, **kwargs)

    monkeypatch.setattr(training, "train_loop", recording_loop)
    config = {"base_model": str(tiny_lora_model_dir), "datasets": [{"path": str(corpus), "type": "completion"}],
              "sequence_len": 16, "val_set_size": 0.1, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
              "max_steps": 1, "label_smoothing_factor": 0.3, "bf16": False, "sample_prompt": "the cat",
              "save_strategy": "no", "output_dir": str(tmp_path / "out")}
    summary = run_pretrain(load_config(str(write_config(tmp_path / "c.yml", config))))

    model = AutoModelForCausalLM.from_pretrained(tiny_lora_model_dir, dtype=torch.float32)  # the weights step 1 ran with
    with torch.no_grad():
        def mean(smoothing: float) -> float:
            total, count = 0.0, 0
            for batch in seen:
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
                total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                               reduction="sum", label_smoothing=smoothing))
                count += batch["labels"][:, 1:].numel()
            return total / count

        smoothed, plain = mean(0.3), mean(0.0)
    assert len(seen) == 2 and abs(smoothed - plain) > 1e-3
    assert summary["final_train_loss"] == pytest.approx(smoothed, rel=1e-5)  # the plain loss differs by ~0.016


class _Bag(torch.nn.Module):
    """A stand-in masked LM: logits straight from an embedding of the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.embed(input_ids))


def test_masked_lm_objective_counts_every_masked_position_and_smooths() -> None:
    """Every masked position is a target (position 0 too: the work-around for the loop's causal count is gone),
    and label smoothing applies: checked against cross-entropy over a boolean mask."""
    torch.manual_seed(0)
    inputs, labels = mask_tokens(_batch(8, 64), MASK, VOCAB, SPECIAL, 0.3, torch.Generator().manual_seed(2))
    labels[0, 0], inputs[0, 0] = 7, MASK  # a masked first position
    batch = {"input_ids": inputs, "labels": labels, "attention_mask": torch.ones_like(inputs)}
    model, keep = _Bag(), labels != IGNORE_INDEX
    objective = MaskedLM(label_smoothing=0.1)
    loss_sum, count, _ = objective(model, batch)
    assert count == objective.count_tokens(batch) == int(keep.sum())
    reference = F.cross_entropy(model(inputs).logits[keep], labels[keep], reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(loss_sum, reference)
    plain, _, _ = objective.for_evaluation()(model, batch)
    torch.testing.assert_close(plain, F.cross_entropy(model(inputs).logits[keep], labels[keep], reduction="sum"))


def test_objective_from_config_carries_the_loss_keys(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", label_smoothing_factor=0.2, chunked_cross_entropy=True,
                         chunked_cross_entropy_num_chunks=3)
    objective = objective_from_config(load_config(str(write_config(tmp_path / "c.yml", config))))
    assert objective == CausalLM(label_smoothing=0.2, loss_chunks=3)
    assert objective.for_evaluation() == CausalLM(loss_chunks=3)  # the eval loss stays plain


def test_pretrain_recipe_is_only_wiring() -> None:
    """recipes/pretrain.py wires the tokenizer, shards, model, objective and loop; their code lives elsewhere."""
    source = Path(__file__).resolve().parents[1] / "lmforge/recipes/pretrain.py"
    assert len(source.read_text(encoding="utf-8").splitlines()) <= 200
