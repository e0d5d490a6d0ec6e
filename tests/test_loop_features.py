"""Loop features on the tiny Llama: optimizers, NaN policy, early stopping, best model, freezing, dropout, label smoothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_config, write_config
from lmforge.config import load_config
from lmforge.data.batching import collate
from lmforge.data.prepare import Example
from lmforge.errors import LmforgeError
from lmforge.train.loop import Callbacks, LoopSettings, NonFiniteError, train_loop
from lmforge.train.loss import causal_lm_loss
from lmforge.train.optimizers import build_optimizer
from lmforge.models.params import set_dropout

EXAMPLES = [Example([1, 5, 6, 7, 8, 9, 10, 2], [-100, -100, 6, 7, 8, 9, 10, 2]), Example([1, 5, 11, 12, 2], [-100, -100, 11, 12, 2])]


def _model(tiny_model_dir: Path):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _batches(n: int):  # noqa: ANN202
    return iter([collate(EXAMPLES, 0) for _ in range(n)])


def _run(model, optimizer, steps: int, **settings):  # noqa: ANN001, ANN202
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loss_fn = settings.pop("loss_fn", causal_lm_loss)
    eval_fn = settings.pop("eval_fn", None)
    callbacks = settings.pop("callbacks", None)
    return train_loop(model, optimizer, scheduler, _batches(steps), LoopSettings(total_steps=steps, timing_warmup_steps=0, **settings),
                      eval_fn, callbacks, loss_fn)


@pytest.mark.learning
@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "sgd", "adafactor", "lion_8bit", "lion_32bit"])
def test_every_optimizer_lowers_the_loss(tiny_model_dir: Path, name: str) -> None:
    model = _model(tiny_model_dir)
    lr = {"sgd": 0.5, "adafactor": 0.01}.get(name, 0.003)
    optimizer = build_optimizer(model, name, lr, 0.01, (0.9, 0.99), 1e-8, momentum=0.9, nesterov=name == "sgd")
    result = _run(model, optimizer, 12)
    assert result.train_history[-1][1] < 0.8 * result.train_history[0][1], result.train_history
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["nesterov"]
    # weight decay stays off norms and biases
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_bnb_8bit_states_are_8bit_and_round_trip(tmp_path: Path) -> None:
    layer = torch.nn.Linear(128, 128, bias=False)
    optimizer = build_optimizer(layer, "adamw_bnb_8bit", 1e-3, 0.0, (0.9, 0.999), 1e-8)
    layer(torch.randn(4, 128)).sum().backward()
    optimizer.step()
    assert optimizer.state[layer.weight]["state1"].dtype == torch.uint8
    torch.save(optimizer.state_dict(), tmp_path / "o.pt")
    again = build_optimizer(layer, "adamw_bnb_8bit", 1e-3, 0.0, (0.9, 0.999), 1e-8)
    again.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert torch.equal(again.state[layer.weight]["state1"], optimizer.state[layer.weight]["state1"])


def _nan_at(step_to_break: int, grad: bool = False):  # noqa: ANN202
    calls = {"n": 0}

    def loss_fn(model, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss_sum, count = causal_lm_loss(model, batch)
        if calls["n"] == step_to_break:
            if grad:  # a finite loss whose gradient is NaN
                loss_sum = loss_sum + 0.0 * torch.sqrt(-model.lm_head.weight.sum().abs() - 1)
            else:
                loss_sum = loss_sum * float("nan")
        return loss_sum, count

    return loss_fn


def test_nan_loss_stops_naming_the_step_with_weights_of_the_last_good_step(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteError, match="loss is not finite at step 3"):
        _run(model, optimizer, 6, loss_fn=_nan_at(3))
    reference = _model(tiny_model_dir)
    _run(reference, torch.optim.AdamW(reference.parameters(), lr=0.01), 2)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_nan_gradient_is_skipped_with_skip_policy(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    result = _run(model, optimizer, 5, loss_fn=_nan_at(2, grad=True), nan_policy="skip", max_grad_norm=None)
    assert result.skipped_steps == [2] and result.steps == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(optimizer.state[model.lm_head.weight]["step"]) == 4  # the skipped step never reached the optimizer


def test_nan_in_a_run_names_the_last_good_checkpoint(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.recipes.finetune as recipe
    import lmforge.recipes.run as training
    from lmforge.train.objectives import as_objective

    monkeypatch.setattr(training, "objective_from_config", lambda cfg: as_objective(_nan_at(5)))  # micro-batch 5 = step 5
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, alpaca_file, out, adapter=None, max_steps=8, save_steps=2, learning_rate=0.003)
    with pytest.raises(LmforgeError, match=r"not finite at step 5.*last good checkpoint: .*checkpoint-4"):
        recipe.run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    assert not (out / "model.safetensors").exists(), "nothing is saved after a NaN"
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-4" / "model.safetensors")).values())


def test_early_stopping_counts_evaluations_without_improvement(tiny_model_dir: Path) -> None:
    losses = iter([3.0, 2.0, 2.5, 2.1, 1.0])
    bests = []

    class Record(Callbacks):
        def on_best(self, step: int, eval_loss: float) -> None:
            bests.append(step)

    model = _model(tiny_model_dir)
    result = _run(model, torch.optim.SGD(model.parameters(), lr=0.0), 10, eval_every=2, early_stopping_patience=2,
                  eval_fn=lambda: next(losses), callbacks=Record())
    assert result.stop_reason == "early_stopping"
    assert result.steps == 8  # evals at 2, 4 (best), 6, 8: two without improvement
    assert (result.best_step, result.best_eval_loss) == (4, 2.0)
    assert bests == [2, 4]


def test_load_best_model_at_end_saves_the_best_weights(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.recipes.finetune as recipe
    import lmforge.recipes.run as shared_setup

    scripted = iter([5.0, 3.0, 2.0, 2.5, 2.6, 2.7])  # step 0, then evals at steps 1..5
    monkeypatch.setattr(shared_setup, "evaluate", lambda *a, **k: next(scripted))
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, alpaca_file, out, adapter=None, max_steps=6, eval_steps=1, save_steps=1, val_set_size=4,
                      learning_rate=0.003, early_stopping_patience=3, load_best_model_at_end=True)
    summary = recipe.run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 5
    assert summary["best_step"] == 2 and summary["eval_loss_end"] == 2.0
    final, best, last = (load_file(str(p / "model.safetensors")) for p in (out, out / "checkpoint-2", out / "checkpoint-4"))
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
    text = (out / "summary.md").read_text()
    assert "best eval loss" in text and "2.0000 at step 2" in text
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unfrozen_parameters_train_only_the_matches(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from lmforge.recipes.finetune import run_train

    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, alpaca_file, out, adapter=None, max_steps=3, learning_rate=0.01,
                      unfrozen_parameters=["lm_head", r"model\.layers\.1\.mlp\."])
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lm_head.weight"} | {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert summary["trainable_parameters"] == sum(before[k].numel() for k in changed)

    with pytest.raises(LmforgeError, match="matches no parameter"):
        run_train(load_config(str(write_config(tmp_path / "c.yml", {**cfg, "unfrozen_parameters": ["decoder.blocks"]}))))


def test_dropout_override_reaches_the_live_modules(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    batch = collate(EXAMPLES, 0)
    assert set_dropout(model, 0.5) == ["attention_dropout"]
    assert model.config.attention_dropout == 0.5
    assert model.model.layers[0].self_attn.attention_dropout == 0.5
    model.train()
    a, b = (model(input_ids=batch["input_ids"]).logits for _ in range(2))
    assert not torch.equal(a, b), "dropout had no effect in train mode"
    model.eval()
    assert torch.equal(model(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)


def test_label_smoothing_matches_its_definition(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    batch = collate(EXAMPLES, 0)
    smooth, n = causal_lm_loss(model, batch, label_smoothing=0.1)
    plain, _ = causal_lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logp = F.log_softmax(logits[keep], -1)
    manual = (0.9 * -logp.gather(1, targets[keep][:, None]).squeeze(1) + 0.1 * -logp.mean(-1)).sum()
    assert torch.allclose(smooth, manual, atol=1e-4)
    assert not torch.allclose(smooth, plain)
    assert math.isfinite(float(smooth)) and n == int(keep.sum())
