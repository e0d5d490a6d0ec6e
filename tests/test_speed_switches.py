"""Speed and memory switches must leave the loss and its gradients unchanged (issue 14).

Each switch is compared with the plain path on a tiny random Llama, on a padded batch whose
labels skip the prompt, so a switch that dropped, duplicated or mis-aligned positions would show.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from conftest import tiny_llama_config
from lmforge.data.prepare import IGNORE_INDEX
from lmforge.train.loss import causal_lm_loss


def _model_and_batch(tie: bool = False):  # noqa: ANN202
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=97, tie_word_embeddings=tie, pad_token_id=0))
    input_ids = torch.randint(1, 97, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 14:] = 0  # a padded row
    input_ids[1, 14:] = 0
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX  # the prompt
    labels[attention_mask == 0] = IGNORE_INDEX
    return model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _loss_and_grads(model, batch, loss_fn):  # noqa: ANN001, ANN202
    model.zero_grad(set_to_none=True)
    loss_sum, count = loss_fn(model, batch)
    loss_sum.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss_sum.detach()), count, grads


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunks", [2, 7])
def test_chunked_cross_entropy_keeps_loss_and_gradients(tie: bool, chunks: int) -> None:
    model, batch = _model_and_batch(tie)
    plain_loss, plain_count, plain_grads = _loss_and_grads(model, batch, causal_lm_loss)
    loss, count, grads = _loss_and_grads(model, batch, partial(causal_lm_loss, loss_chunks=chunks))
    assert count == plain_count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_cross_entropy_with_label_smoothing_and_bf16_autocast() -> None:
    model, batch = _model_and_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, _, _ = _loss_and_grads(model, batch, partial(causal_lm_loss, label_smoothing=0.1))
        loss, _, _ = _loss_and_grads(model, batch, partial(causal_lm_loss, label_smoothing=0.1, loss_chunks=4))
    assert loss == pytest.approx(plain_loss, rel=1e-3)


def test_chunked_cross_entropy_keys_load(tiny_model_dir, alpaca_file, tmp_path) -> None:  # noqa: ANN001
    from conftest import tiny_config, write_config
    from lmforge.config import load_config

    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", chunked_cross_entropy=True,
                         chunked_cross_entropy_num_chunks=3)
    cfg = load_config(str(write_config(tmp_path / "c.yml", config)), [])
    assert cfg.training.chunked_cross_entropy is True
    assert cfg.training.chunked_cross_entropy_num_chunks == 3
