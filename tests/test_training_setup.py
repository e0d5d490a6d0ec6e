"""The shared training setup in `pretrain`: checkpoints and an exact resume after SIGKILL, MLM masks that
resume, LoRA/QLoRA for continued pretraining, early stopping; and one tokenizer loader for every command."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, WORDS, tiny_config, write_config
from lmforge.config import load_config
from lmforge.recipes.pretrain import run_pretrain
from lmforge.train.checkpoint import list_checkpoints, verify_checkpoint

SHAKESPEARE = REPO / "data/tinyshakespeare/input.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer and shards made once and reused by every run of this module (the runs only train)."""
    return tmp_path_factory.mktemp("shared")


def scratch(corpus: Path, shared: Path, out: Path, **extra: object) -> dict:
    config = {
        "model_config": {"architecture": "llama", "preset": "tiny"},
        "tokenizer_train": {"files": [str(corpus)], "vocab_size": 300, "output_dir": str(shared / "tokenizer")},
        "pretraining_dataset": [str(corpus)],
        "shards_dir": str(shared / "shards"),
        "sequence_len": 32,
        "val_set_size": 0.1,
        "micro_batch_size": 8,
        "max_steps": 12,
        "learning_rate": 0.005,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "dropout": 0.1,  # the RNG state must resume too
        "gradient_accumulation_steps": 2,
        "save_steps": 2,
        "eval_steps": 4,
        "bf16": False,
        "logging_steps": 1,
        "output_dir": str(out),
    }
    config.update(extra)
    return config


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_pretrain_sigkill_then_resume_auto_is_bit_identical(corpus: Path, shared: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    summary = run_pretrain(load_config(str(write_config(tmp_path / "ref.yml", scratch(corpus, shared, reference)))))
    assert summary["steps"] == 12 and (reference / "checkpoint-12").is_dir()  # the final state is a checkpoint too

    out = tmp_path / "killed"
    config = str(write_config(tmp_path / "kill.yml", scratch(corpus, shared, out)))
    kill_after = random.choice([2, 4, 6])
    proc = _cli("pretrain", config)
    deadline = time.monotonic() + 300
    while not (out / f"checkpoint-{kill_after}").exists():
        assert proc.poll() is None, f"run ended before checkpoint-{kill_after}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before the kill: the test proves nothing"

    resumed = _cli("pretrain", config, "--resume_from_checkpoint=auto")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert "resumed from" in log and "windows consumed" in log
    _same_weights(load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors")))
    ref_summary, summary = (json.loads((d / "summary.json").read_text()) for d in (reference, out))
    assert summary["eval_history"] == ref_summary["eval_history"] and summary["total_tokens"] == ref_summary["total_tokens"]
    assert (out / "loss_curves.png").is_file() and (out / "summary.md").is_file()


def test_mlm_masks_resume_with_the_data_position(corpus: Path, shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = scratch(corpus, shared, out, model_config={"architecture": "bert", "preset": "tiny"}, objective="mlm",
                     max_steps=6, save_steps=3, dropout=None, save_total_limit=3)
    path = str(write_config(tmp_path / "c.yml", config))
    run_pretrain(load_config(path))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-3"]
    straight = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    summary = run_pretrain(load_config(path, [f"--resume_from_checkpoint={out / 'checkpoint-3'}"]))
    assert summary["resumed_from"] == str(out / "checkpoint-3")
    _same_weights(straight, load_file(str(out / "model.safetensors")))


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text in the tiny tokenizer's vocabulary (a base model's own words)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(600)), encoding="utf-8")
    return path


@pytest.mark.learning
@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_continued_pretraining_trains_only_the_adapter(adapter: str, word_corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    config = {
        "base_model": str(tiny_model_dir), "pretraining_dataset": [str(word_corpus)], "adapter": adapter,
        "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "sequence_len": 32, "micro_batch_size": 8,
        "max_steps": 6, "save_steps": 3, "learning_rate": 0.01, "lr_scheduler": "constant", "bf16": adapter == "qlora",
        "output_dir": str(out), "logging_steps": 3,
        **({"load_in_4bit": True} if adapter == "qlora" else {}),
    }
    summary = run_pretrain(load_config(str(write_config(tmp_path / "c.yml", config))))
    assert summary["trainable_parameters"] < summary["total_parameters"] / 4
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists(), "a LoRA run must not save a full copy of the base"
    for folder in list_checkpoints(out):
        verify_checkpoint(folder)
        assert (folder / "adapter_model.safetensors").is_file()
    assert summary["eval_loss"] < summary["eval_loss_start"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    assert not torch.allclose(base(input_ids=ids).logits, tuned(input_ids=ids).logits)


def test_pretrain_stops_early_and_restores_the_best(corpus: Path, shared: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.recipes.run as shared_setup

    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 9.0])  # step 0, then evals at steps 1..5
    monkeypatch.setattr(shared_setup, "evaluate", lambda *a, **k: next(scripted))
    out = tmp_path / "out"
    summary = run_pretrain(load_config(str(write_config(tmp_path / "c.yml", scratch(
        corpus, shared, out, eval_steps=1, save_steps=1, early_stopping_patience=3, load_best_model_at_end=True)))))
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 5 and summary["best_step"] == 2
    final, best = (load_file(str(p / "model.safetensors")) for p in (out, out / "checkpoint-2"))
    _same_weights(final, best)


def test_preprocess_and_train_share_the_prepared_data(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from lmforge.data import cache
    from lmforge.models.load import config_tokenizer
    from lmforge.recipes.preprocess import run_preprocess
    from lmforge.recipes.finetune import run_train

    prepared = tmp_path / "prepared"
    # special_tokens change the tokenizer (and so the cache key): both commands must add them alike.
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=1, dataset_prepared_path=str(prepared),
                         special_tokens={"pad_token": "<unk>"}, val_set_size=4)
    cfg = load_config(str(write_config(tmp_path / "c.yml", config)))
    run_preprocess(cfg)
    entries = [p.name for p in prepared.iterdir() if not p.name.startswith(".")]
    assert entries == [cache.cache_key(cfg.data, config_tokenizer(cfg), cfg.training.seed)]
    capsys.readouterr()
    run_train(cfg)
    assert f"reused prepared data {prepared / entries[0]}" in capsys.readouterr().out
    assert [p.name for p in prepared.iterdir() if not p.name.startswith(".")] == entries
