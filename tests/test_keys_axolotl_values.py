"""Issue 26: axolotl keys that were refused and now act, or are accepted with the notice axolotl's own behaviour
earns (center_rewards_coefficient, eta_min / adam_eps, swanlab completion tables, fp16 on a CPU). Each test fails if
its key is ignored or refused again. Tiny models; seconds each."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config, write_config, write_jsonl
from lmforge.config import load_config

PAIR = {"prompt": "what is one plus two ?", "chosen": "three", "rejected": "four"}


def _load(tmp_path: Path, model_dir: Path, data: Path, **keys: object):  # noqa: ANN202
    return load_config(str(write_config(tmp_path / "c.yml", tiny_config(model_dir, data, tmp_path / "out", **keys))))


def _reward_config(tmp_path: Path, model_dir: Path, **keys: object):  # noqa: ANN202
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    return _load(tmp_path, model_dir, data, rl=None, reward_model=True, num_labels=1,
                 datasets=[{"path": str(data), "type": {"field_prompt": "prompt"}}], **keys)


class _FixedScores(torch.nn.Module):
    """A 'model' whose score head says the given numbers: the loss is then a closed formula."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores).unsqueeze(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool) -> SimpleNamespace:
        return SimpleNamespace(logits=self.scores)


def test_center_rewards_coefficient_adds_trls_centering_term_to_the_reward_loss(tmp_path: Path, tiny_model_dir: Path) -> None:
    from lmforge.train.preference import preference_objective

    cfg = _reward_config(tmp_path, tiny_model_dir, center_rewards_coefficient=0.01)
    objective = preference_objective(cfg.rl)
    chosen, rejected = [1.0, -0.5, 2.0], [0.25, 0.5, -1.0]
    model = _FixedScores(chosen + rejected)
    batch = {"input_ids": torch.zeros(6, 4, dtype=torch.long), "attention_mask": torch.ones(6, 4, dtype=torch.long)}
    loss_sum, pairs, _ = objective(model, batch)
    # TRL's RewardTrainer per pair: -log σ(c - r) + coef (c + r)²; lmforge returns the sum over pairs and their count
    bradley_terry = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected))
    centering = 0.01 * sum((c + r) ** 2 for c, r in zip(chosen, rejected))
    assert pairs == 3
    assert loss_sum.item() == pytest.approx(bradley_terry + centering, rel=1e-6)
    assert centering > 1e-3  # the term is large enough that ignoring the key fails the line above
    plain, _, _ = preference_objective(_reward_config(tmp_path, tiny_model_dir).rl)(model, batch)
    assert plain.item() == pytest.approx(bradley_terry, rel=1e-6)
    loss_sum.backward()  # the centering term's gradient: 2 coef (c + r) on each score, beside the Bradley-Terry one
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    torch.testing.assert_close(model.scores.grad.squeeze(1),
                               torch.cat([-torch.sigmoid(r - c), torch.sigmoid(r - c)]) + 0.02 * torch.cat([c + r, c + r]))


def test_center_rewards_coefficient_without_a_reward_model_says_it_changes_nothing(tmp_path: Path, alpaca_file: Path,
                                                                                   tiny_model_dir: Path) -> None:
    cfg = _load(tmp_path, tiny_model_dir, alpaca_file, center_rewards_coefficient=0.01)
    assert any("center_rewards_coefficient" in w and "changes nothing" in w for w in cfg.warnings)


def test_eta_min_and_adam_eps_are_ignored_as_axolotl_ignores_them(tmp_path: Path, alpaca_file: Path,
                                                                  tiny_model_dir: Path) -> None:
    """axolotl's schema has neither key and drops unknown keys (pydantic's extra="ignore"): the same config runs
    the same schedule and optimizer there. Here too, with a notice naming the key that does it."""
    plain = _load(tmp_path, tiny_model_dir, alpaca_file, lr_scheduler="cosine")
    cfg = _load(tmp_path, tiny_model_dir, alpaca_file, lr_scheduler="cosine", eta_min=7e-7, adam_eps=1e-5)
    assert cfg.training.adam_epsilon == plain.training.adam_epsilon
    assert cfg.training.cosine_min_lr_ratio == plain.training.cosine_min_lr_ratio
    texts = {n.key: n.text for n in cfg.notices}
    assert "cosine_min_lr_ratio" in texts["eta_min"] and "adam_epsilon" in texts["adam_eps"]


@pytest.mark.parametrize("order", ["float16 first", "fp16 first"])
def test_float16_trains_as_fp16_whatever_fp16_false_beside_it_says(tmp_path: Path, alpaca_file: Path,
                                                                   tiny_model_dir: Path, order: str) -> None:
    """axolotl's float16: true (with bf16: false, fp16: false beside it, as its archived examples write it) trains in
    float16: here as fp16: true, in either key order, with a notice saying how; without it fp16 stays off."""
    keys = {"float16": True, "fp16": False} if order == "float16 first" else {"fp16": False, "float16": True}
    cfg = _load(tmp_path, tiny_model_dir, alpaca_file, **keys)
    assert cfg.speed.fp16 is True
    assert "fp32 master weights" in {n.key: n.text for n in cfg.notices}["float16"]
    assert _load(tmp_path, tiny_model_dir, alpaca_file, fp16=False).speed.fp16 is False


def test_swanlab_completion_keys_get_a_notice_like_use_swanlab(tmp_path: Path, alpaca_file: Path, tiny_model_dir: Path) -> None:
    keys = {"swanlab_log_completions": True, "swanlab_completion_log_interval": 100, "swanlab_completion_max_buffer": 128}
    cfg = _load(tmp_path, tiny_model_dir, alpaca_file, swanlab_project="p", swanlab_mode="offline", **keys)
    notices = {n.key: n.text for n in cfg.notices}
    assert set(keys) <= set(notices)
    assert all("completion" in notices[k] for k in keys)
    assert "swanlab_log_completions" not in {n.key for n in _load(tmp_path, tiny_model_dir, alpaca_file,
                                                                  swanlab_log_completions=False).notices}


def test_fp16_on_a_cpu_trains_under_float16_autocast_and_resumes_with_its_loss_scale(tmp_path: Path, alpaca_file: Path,
                                                                                     tiny_model_dir: Path) -> None:
    import json

    from safetensors.torch import load_file

    from lmforge.recipes.finetune import run_train
    from lmforge.recipes.run import TrainingRun

    out = tmp_path / "out"
    keys = dict(adapter=None, fp16=True, bf16=False, max_steps=4, save_steps=2, save_total_limit=3, learning_rate=1e-3)
    path = str(write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, out, **keys)))
    cfg = load_config(path, gpu=False)
    assert any(n.key == "fp16" and "GradScaler" in n.text for n in cfg.notices)  # accepted, saying how it runs
    run = TrainingRun(cfg)
    assert run.autocast_dtype == torch.float16 and run.device.type == "cpu"
    run_train(cfg)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 65536.0 and state["grad_scaler"]["_growth_tracker"] == 2  # 2 clean steps
    straight = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in straight.values()) and any(not torch.equal(straight[k], base[k]) for k in base)
    (out / "model.safetensors").unlink()
    run_train(load_config(path, [f"--resume_from_checkpoint={out / 'checkpoint-2'}"], gpu=False))
    resumed = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_lora_dropout_on_fused_experts_is_one_line_naming_the_fix() -> None:
    """axolotl's Mixtral examples (lora_target_linear, lora_dropout 0.05) on transformers 5's fused 3-D experts: peft
    adapts those through lora.ParamWrapper, which takes no dropout; the run stops in one line naming lora_dropout
    (it was peft's ValueError), and trains with lora_dropout: 0."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from lmforge.config.sections import AdapterSection
    from lmforge.errors import LmforgeError
    from lmforge.models.adapters import apply_lora

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    settings = AdapterSection(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.05, lora_target_linear=True)
    with pytest.raises(LmforgeError) as caught:
        apply_lora(MixtralForCausalLM(config), settings)
    assert caught.value.where == "lora_dropout" and "lora_dropout: 0" in str(caught.value)
    model = apply_lora(MixtralForCausalLM(config), settings.model_copy(update={"lora_dropout": 0.0}))
    assert any("lora" in name for name, _ in model.named_parameters())


def test_swanlab_cloud_mode_without_a_key_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """axolotl's swanlab profiling example (swanlab_mode: cloud) on a machine never logged in: SwanLab's own
    KeyFileError became a one-line error naming swanlab_mode and the offline mode."""
    import swanlab

    from lmforge.config.sections import LoggingSection
    from lmforge.errors import LmforgeError
    from lmforge.train.loggers import SwanLabLogger

    def not_logged_in(**_: object) -> None:
        raise swanlab.error.KeyFileError("api key not configured (no-tty)")

    monkeypatch.setattr(swanlab, "init", not_logged_in)
    with pytest.raises(LmforgeError) as caught:
        SwanLabLogger(LoggingSection(swanlab_project="p", swanlab_mode="cloud"), {}, str(tmp_path))
    assert caught.value.where == "swanlab_mode" and "swanlab_mode: offline" in str(caught.value)


def test_wandb_online_without_a_key_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An axolotl example with wandb_project on a machine never logged in to W&B: W&B's UsageError became one line."""
    import wandb

    from lmforge.config.sections import LoggingSection
    from lmforge.errors import LmforgeError
    from lmforge.train.loggers import WandbLogger

    def not_logged_in(**_: object) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", not_logged_in)
    with pytest.raises(LmforgeError) as caught:
        WandbLogger(LoggingSection(wandb_project="p"), {}, str(tmp_path))
    assert caught.value.where == "wandb_project" and "wandb_mode: offline" in str(caught.value)
