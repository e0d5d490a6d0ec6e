"""The training loop on a tiny random Llama: the loss falls, prompts carry no loss, outputs load without lmforge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, write_config
from lmforge.config import load_config
from lmforge.data.batching import collate
from lmforge.data.prepare import IGNORE_INDEX, Example
from lmforge.recipes.finetune import run_train
from lmforge.train.loss import causal_lm_loss, uses_fast_path


@pytest.mark.learning
def test_lora_training_lowers_loss_and_saves_peft_format(tiny_lora_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = tiny_config(tiny_lora_model_dir, alpaca_file, out, val_set_size=4, learning_rate=0.02)
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    assert summary["steps"] == 30
    # Held-out loss ends at 0.31-0.37x its start over 4 seeds, on AMX and under ATEN_CPU_CAPABILITY=avx2 alike.
    assert summary["eval_loss_end"] < 0.6 * summary["eval_loss_start"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yml", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard event file missing"


@pytest.mark.learning
def test_full_finetune_lowers_loss_fast(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", val_set_size=4, adapter=None, learning_rate=0.003)
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    assert summary["trainable_parameters"] == summary["total_parameters"]
    assert summary["eval_loss_end"] < 0.6 * summary["eval_loss_start"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _tiny_model(tiny_model_dir: Path):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_prompt_tokens_contribute_nothing_to_the_loss(tiny_model_dir: Path) -> None:
    model = _tiny_model(tiny_model_dir)
    prompt, response = [5, 6, 7, 8], [9, 10, 2]
    batch = collate([Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response)], pad_token_id=0)
    loss_sum, count = causal_lm_loss(model, batch)
    assert count == len(response)
    # The same loss by hand: next-token cross-entropy on the response positions only.
    logits = model(input_ids=batch["input_ids"]).logits[0]
    start = len(prompt) - 1  # the logit at position t predicts token t+1
    manual = F.cross_entropy(logits[start : start + len(response)], torch.tensor(response), reduction="sum")
    assert torch.allclose(loss_sum, manual, atol=1e-5)
    # And the gradient of the loss w.r.t. prompt-position logits is zero.
    model.zero_grad()
    out = model(input_ids=batch["input_ids"])
    out.logits.retain_grad()
    targets = batch["labels"][:, 1:]
    F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX).backward()
    assert out.logits.grad[0, : start].abs().sum() == 0
    assert out.logits.grad[0, start : start + len(response)].abs().sum() > 0


def test_fast_path_matches_full_logits_with_padding(tiny_model_dir: Path) -> None:
    model = _tiny_model(tiny_model_dir)
    assert uses_fast_path(model)
    batch = collate([Example([1, 5, 6, 7, 8, 9], [-100, -100, -100, 7, 8, 9]), Example([1, 5, 6], [-100, 5, 6])], pad_token_id=0)
    fast, n = causal_lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert n == 5
    assert torch.allclose(fast, reference, atol=1e-5)


def test_saved_adapter_loads_in_plain_peft_with_identical_logits(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.infer.prompts import PromptBuilder
    from lmforge.models.trained import load_for_generation

    out = tmp_path / "out"
    cfg = load_config(str(write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, out, max_steps=5))))
    run_train(cfg)

    plain_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(plain_base, out).eval()
    loaded = load_for_generation(cfg.model.base_model, str(out), dtype=torch.float32)
    tokenizer, ours = loaded.tokenizer, loaded.model
    prompt = PromptBuilder.from_config(cfg, tokenizer).single("what is two plus two ?")
    ids = AutoTokenizer.from_pretrained(out)(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
        base_diff = (plain_base(input_ids=ids).logits - AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4
    assert base_diff > 1e-3, "adapter had no effect: the comparison would prove nothing"


def test_gradient_accumulation_weights_tokens_not_batches(tiny_model_dir: Path) -> None:
    """Two micro-batches of 1 must give the same gradient as one batch of 2."""
    from lmforge.train.loop import LoopSettings, train_loop

    examples = [Example([1, 5, 6, 7, 8, 9, 10, 2], [-100, -100, 6, 7, 8, 9, 10, 2]), Example([1, 5, 2], [-100, -100, 2])]
    grads = []
    for batches, accum in (([collate(examples, 0)], 1), ([collate(examples[:1], 0), collate(examples[1:], 0)], 2)):
        model = _tiny_model(tiny_model_dir)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        captured = {}
        optimizer.step = lambda captured=captured, model=model: captured.update(g=model.lm_head.weight.grad.clone())  # type: ignore[method-assign]
        train_loop(model, optimizer, scheduler, iter(batches), LoopSettings(total_steps=1, grad_accum=accum, max_grad_norm=None))
        grads.append(captured["g"])
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.learning
def test_qlora_trains_through_the_recipe(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, alpaca_file, out, adapter="qlora", load_in_4bit=True, max_steps=8, val_set_size=4, bf16=True)
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    assert summary["eval_loss_end"] < summary["eval_loss_start"]
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.learning
def test_gpt2_conv1d_lora_with_fan_in_fan_out(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = tiny_config(
        model_dir, alpaca_file, tmp_path / "out", lora_target_linear=False, lora_target_modules=["c_attn", "c_proj"],
        lora_fan_in_fan_out=True, val_set_size=4, max_steps=20,
    )
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", cfg))))
    assert summary["eval_loss_end"] < summary["eval_loss_start"]
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] is True and set(adapter["target_modules"]) == {"c_attn", "c_proj"}


@pytest.mark.learning
def test_training_continues_from_an_existing_adapter(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    first = run_train(load_config(str(write_config(tmp_path / "a.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "a", val_set_size=4, max_steps=10)))))
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "b", val_set_size=4, max_steps=5, lora_model_dir=str(tmp_path / "a"))
    second = run_train(load_config(str(write_config(tmp_path / "b.yml", cfg))))
    # The second run starts where the first ended, not from the base model.
    assert abs(second["eval_loss_start"] - first["eval_loss_end"]) < 1e-3
    assert second["eval_loss_start"] < first["eval_loss_start"] - 1e-3


def test_a_run_shorter_than_the_timing_warm_up_still_reports_its_tokens_per_second(tiny_model_dir: Path, alpaca_file: Path,
                                                                                   tmp_path: Path) -> None:
    """tokens/s leaves out the first steps (one-off costs); a 1-step run has only those, and reports them, not 0."""
    cfg = load_config(str(write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=1))))
    summary = run_train(cfg)
    assert summary["steps"] == 1 and summary["tokens_per_s"] > 0
