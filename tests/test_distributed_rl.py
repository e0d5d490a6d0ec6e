"""Preference tuning and GRPO on several ranks (torchrun, gloo on CPU), as tests/test_distributed.py does for SFT.

Two ranks train as one process with the same global batch: the same per-step loss, the same logged numbers (reduced
over the ranks, not rank 0's), the same weights. DPO: DDP and FSDP2 with LoRA, DDP full fine-tuning with precomputed
reference log-probabilities. GRPO: DDP and FSDP2 with LoRA; each completion samples from its own seeded stream, so the
two ranks sample the completions one process samples, and FSDP2 generates (and evaluates) with every rank in lockstep.
One torchrun launch runs all the 2-rank configs (tests/distributed_runs.py), to pay the start-up once.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, write_config, write_jsonl
from lmforge.config import load_config
from lmforge.recipes.finetune import run_train
from test_distributed import FSDP_CONFIG, _env, _torchrun, _weights

# One torchrun launch of five runs: minutes on 2 cores; CI's full suite runs it (`-m "not slow"` skips it).
pytestmark = pytest.mark.slow

STEPS = 4
PAIRS = [{"prompt": f"what is {a} plus {b} ?", "chosen": f"{a} plus {b} equals {a + b}", "rejected": f"{a} plus {b} equals {a + b + 1}"}
         for a in range(1, 7) for b in range(1, 5)]  # 24: 20 train, 4 held out
DPO_KINDS = {"ddp-lora": {}, "fsdp-lora": {"fsdp_config": FSDP_CONFIG},
             "ddp-full": {"adapter": None, "learning_rate": 0.001, "precompute_ref_log_probs": True}}
REFERENCE = {"ddp-lora": "one-lora", "fsdp-lora": "one-lora", "ddp-full": "one-full"}

# GRPO's reward: the first completion token mod 7 (varied on a random model), and each call's scores written down
# per process, to see that both ranks scored completions.
REWARDS = '''
import json, os


def prompt_transform(cfg, *args, **kwargs):
    def transform(row):
        return {"prompt": row["question"]}
    return transform, {"remove_columns": ["question"]}


def first_token(completions, completion_ids, **kwargs):
    scores = [float(ids[0] % 7) if ids else 0.0 for ids in completion_ids]
    with open(os.path.join(os.path.dirname(__file__), f"scores-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(scores) + "\\n")
    return scores
'''
QUESTIONS = ["what is the answer", "is the dog red", "how many fish are there", "give the total of one plus two",
             "tell the name of the bird", "what is blue", "where is the cat", "add one and two"]
GRPO_KINDS = {"grpo-ddp": {}, "grpo-fsdp": {"fsdp_config": FSDP_CONFIG}}


def _dpo_config(model_dir: Path, data: Path, out: Path, accumulation: int, **extra: object) -> dict:
    config = tiny_config(model_dir, data, out, **{
        "rl": "dpo", "datasets": [{"path": str(data), "type": {"field_prompt": "prompt"}}], "val_set_size": 4,
        "micro_batch_size": 2, "gradient_accumulation_steps": accumulation, "max_steps": STEPS, "learning_rate": 0.01,
        "logging_steps": 1, "save_steps": STEPS, "eval_steps": STEPS, "eval_batch_size": 2, "seed": 7,
        "dataset_prepared_path": str(out) + "-prepared", **extra})
    if config.get("adapter") is None:
        for key in ("adapter", "lora_r", "lora_alpha", "lora_target_linear"):
            config.pop(key)
    return {k: v for k, v in config.items() if v is not None}


def _grpo_config(folder: Path, model_dir: Path, out: Path, accumulation: int, **extra: object) -> dict:
    return {
        "base_model": str(model_dir), "rl": "grpo", "seed": 7, "bf16": False, "output_dir": str(out),
        "datasets": [{"path": str(folder / "prompts.jsonl"), "type": "rewards.prompt_transform"}],
        "trl": {"num_generations": 4, "max_completion_length": 6, "reward_funcs": ["rewards.first_token"], "beta": 0.04,
                "temperature": 5.0},
        "val_set_size": 4, "sequence_len": 32, "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
        "micro_batch_size": 4, "gradient_accumulation_steps": accumulation, "max_steps": 2, "learning_rate": 0.02,
        "lr_scheduler": "constant", "logging_steps": 1, **extra,
    }


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed-rl")
    data = write_jsonl(root / "pairs.jsonl", PAIRS)
    folders: dict[str, Path] = {}
    for name, keys in (("one-lora", {}), ("one-full", DPO_KINDS["ddp-full"])):
        folders[name] = root / name
        run_train(load_config(str(write_config(root / f"{name}.yml", _dpo_config(tiny_model_dir, data, root / name, 4, **keys)))))
    configs = []
    for kind, keys in DPO_KINDS.items():
        folders[kind] = root / kind
        configs.append(str(write_config(root / f"{kind}.yml", _dpo_config(tiny_model_dir, data, root / kind, 2, **keys))))
    for kind, keys in {"grpo-one": {}, **GRPO_KINDS}.items():
        folder = root / kind
        folder.mkdir()
        (folder / "rewards.py").write_text(REWARDS, encoding="utf-8")
        write_jsonl(folder / "prompts.jsonl", [{"question": q} for q in QUESTIONS * 2])
        folders[kind] = folder
        config = write_config(folder / "c.yml", _grpo_config(folder, tiny_model_dir, folder / "out", 2 if kind == "grpo-one" else 1, **keys))
        if kind == "grpo-one":  # one process, the same global batch (2 micro-batches a step)
            run_train(load_config(str(config)))
        else:
            configs.append(str(config))
    done = subprocess.run(_torchrun("--standalone", "--nproc_per_node=2", str(REPO / "tests" / "distributed_runs.py"), *configs),
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return folders


def _history(out: Path) -> list[list[float]]:
    return json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["loop"]["train_history"]


@pytest.mark.parametrize("kind", sorted(DPO_KINDS))
def test_dpo_on_two_ranks_trains_as_one_process(kind: str, runs: dict[str, Path]) -> None:
    out, reference = runs[kind], runs[REFERENCE[kind]]
    ours, ref = _history(out), _history(reference)
    assert [s for s, _ in ours] == [s for s, _ in ref] == list(range(1, STEPS + 1))
    worst = max(abs(a - b) for (_, a), (_, b) in zip(ours, ref))
    assert worst < 1e-4, f"per-step loss differs from one process by {worst:.2e}: {ours} vs {ref}"
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert summary["ranks"] == 2 and summary["engine"] == ("FSDP2" if kind.startswith("fsdp") else "DDP")
    # The logged rewards are over both ranks' pairs: one process's numbers (rank 0's alone would differ).
    metrics, ref_metrics = summary["train_metrics"], ref_summary["train_metrics"]
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    for name, value in ref_metrics.items():
        assert abs(metrics[name] - value) < 1e-4, (name, metrics[name], value)
    assert abs(summary["eval_metrics_end"]["rewards/margins"] - ref_summary["eval_metrics_end"]["rewards/margins"]) < 1e-4
    weights, ref_weights = _weights(out), _weights(reference)
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("kind", sorted(GRPO_KINDS))
def test_grpo_on_two_ranks_trains_as_one_process(kind: str, runs: dict[str, Path]) -> None:
    out, reference = runs[kind] / "out", runs["grpo-one"] / "out"
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert summary["ranks"] == 2 and summary["engine"] == ("FSDP2" if "fsdp" in kind else "DDP") and summary["steps"] == 2
    assert len(list(runs[kind].glob("scores-*.jsonl"))) == 2  # each rank scored its own prompts' completions
    ours, ref = (json.loads((d / "checkpoint-2" / "trainer_state.json").read_text())["loop"]["train_history"] for d in (out, reference))
    assert [s for s, _ in ours] == [s for s, _ in ref] == [1, 2]
    worst = max(abs(a - b) for (_, a), (_, b) in zip(ours, ref))
    assert worst < 1e-4, f"per-step loss differs from one process by {worst:.2e}: {ours} vs {ref}"
    # the logged numbers are over both ranks' completions: one process's (rank 0's alone would be half of them)
    for key in ("last_reward", "last_rewards/first_token/mean", "last_completions/mean_length", "last_kl",
                "eval_reward_start", "eval_reward_end"):
        assert summary[key] == pytest.approx(ref_summary[key], abs=1e-4), key
    assert ref_summary["last_reward_std"] > 0 and ref_summary["last_kl"] > 0  # completions differ; the policy moved
    weights, ref_weights = _weights(out), _weights(reference)
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-4, rtol=1e-3, msg=name)
