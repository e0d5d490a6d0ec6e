"""use_eaft (axolotl's entropy-aware focal training): each labelled token's cross-entropy weighted by the entropy of
the model's top-k prediction there, to the power eaft_alpha (lmforge.train.objectives.EntropyAwareFocal)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, write_config
from transformers import AutoModelForCausalLM

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.train.loss import causal_lm_loss
from lmforge.train.objectives import CausalLM, EntropyAwareFocal, objective_from_config, top_k_entropy_weights


def test_top_k_entropy_is_ln_k_for_a_flat_top_and_near_zero_for_a_sure_one() -> None:
    flat = torch.zeros(1, 50)
    sure = torch.full((1, 50), -30.0)
    sure[0, 3] = 30.0
    weights = top_k_entropy_weights(torch.cat([flat, sure]), alpha=1.0, top_k=20)
    assert weights[0].item() == pytest.approx(math.log(20), rel=1e-5)
    assert weights[1].item() < 1e-6
    assert top_k_entropy_weights(flat, alpha=2.0, top_k=20)[0].item() == pytest.approx(math.log(20) ** 2, rel=1e-5)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt the loss skips
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def test_the_eaft_loss_is_the_entropy_weighted_token_cross_entropy(tiny_model_dir: Path) -> None:
    """The objective's sum equals sum_t H_k(p_t)^alpha * CE_t over the labelled positions, the gradient flows only
    through CE (the weights are constants), and alpha 0 gives back plain cross-entropy."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = _batch(model.config.vocab_size)
    eaft_sum, count, _ = EntropyAwareFocal(alpha=1.5, top_k=8)(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        picked = logits[keep]
        top = torch.topk(picked, 8, dim=-1).values.softmax(-1)
        weights = (-(top * top.log()).sum(-1)) ** 1.5
        expected = (F.cross_entropy(picked, targets[keep], reduction="none") * weights).sum()
    assert count == int(keep.sum()) == 16
    assert eaft_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    plain_sum, _ = causal_lm_loss(model, batch)
    assert abs(eaft_sum.item() - plain_sum.item()) > 0.05 * plain_sum.item()  # the weighting changes the loss
    flat_sum, _, _ = EntropyAwareFocal(alpha=0.0)(model, batch)
    assert flat_sum.item() == pytest.approx(plain_sum.item(), rel=1e-6)
    eaft_sum.backward()  # the weights are constants: backward runs through the cross-entropy alone
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_use_eaft_picks_the_objective_and_its_eval_loss_stays_plain(tiny_model_dir: Path, alpaca_file: Path,
                                                                    tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", use_eaft=True, eaft_alpha=0.5, eaft_k=5)
    objective = objective_from_config(load_config(str(write_config(tmp_path / "c.yml", config))))
    assert objective == EntropyAwareFocal(alpha=0.5, top_k=5)
    assert objective.for_evaluation() == CausalLM()
    plain = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")
    assert type(objective_from_config(load_config(str(write_config(tmp_path / "p.yml", plain))))) is CausalLM


def test_a_use_eaft_run_trains_with_the_weighted_loss(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    """The same one-step run with and without use_eaft: the same starting eval loss (plain in both), a different
    training loss (the weighted one)."""
    from lmforge.recipes.finetune import run_train

    summaries = {}
    for eaft in (False, True):
        config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / f"out-{eaft}", max_steps=1, use_eaft=eaft,
                             val_set_size=0.25, save_strategy="no")
        summaries[eaft] = run_train(load_config(str(write_config(tmp_path / f"c-{eaft}.yml", config))))
    assert summaries[True]["final_train_loss"] != pytest.approx(summaries[False]["final_train_loss"], rel=1e-3)


@pytest.mark.parametrize("extra, key", [
    ({"rl": "dpo"}, "use_eaft"),
    ({"chunked_cross_entropy": True}, "chunked_cross_entropy"),
])
def test_use_eaft_where_it_cannot_act_is_refused_in_one_line(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                             extra: dict, key: str) -> None:
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", use_eaft=True, **extra)
    with pytest.raises(LmforgeError) as caught:
        load_config(str(write_config(tmp_path / "c.yml", config)))
    assert key in str(caught.value) and "\n" not in str(caught.value).strip()
