"""Pretraining through the recipe: tiny CLM and MLM runs end to end, the config rules, the CLI entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from conftest import write_config

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data/tinyshakespeare/input.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ~60 kB of Tiny Shakespeare: enough for a 300-token vocabulary and a few hundred windows."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


def tiny(corpus: Path, out: Path, **extra: object) -> dict:
    config = {
        "model_config": {"architecture": "llama", "preset": "tiny"},
        "tokenizer_train": {"files": [str(corpus)], "vocab_size": 300},
        "pretraining_dataset": [str(corpus)],
        "sequence_len": 32,
        "val_set_size": 0.1,
        "micro_batch_size": 16,
        "max_steps": 25,
        "learning_rate": 0.005,
        "lr_scheduler": "constant",
        "bf16": False,
        "logging_steps": 25,
        "output_dir": str(out),
    }
    config.update(extra)
    return config


def run(tmp_path: Path, config: dict) -> dict:
    from lmforge.recipes.pretrain import run_pretrain

    return run_pretrain(load_config(str(write_config(tmp_path / "c.yml", config))))


@pytest.mark.learning
def test_clm_from_scratch_learns_saves_and_reloads(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    summary = run(tmp_path, tiny(corpus, out, sample_prompt="ROMEO:"))
    # From ~ln(300) = 5.7 at random init; 25 steps at this rate reliably reach well under 5.
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.7
    assert 0 < summary["unigram_entropy"] < summary["eval_loss_start"]
    printed = capsys.readouterr().out
    assert "MFLOPs per token" in printed and "vs unigram baseline" in printed and "ROMEO:" in printed
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) == 300
    assert model.config.vocab_size == len(tokenizer)
    assert json.loads((out / "summary.json").read_text())["steps"] == 25
    # A rerun reuses the tokenizer and the shards instead of rebuilding them.
    run(tmp_path, tiny(corpus, out, max_steps=1))
    again = capsys.readouterr().out
    assert "tokenizer: reusing" in again and "shards: reusing" in again


@pytest.mark.learning
def test_mlm_from_scratch_learns_and_reloads(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "out"
    summary = run(tmp_path, tiny(corpus, out, model_config={"architecture": "bert", "preset": "tiny"}, objective="mlm",
                                 mlm_probability=0.3, sample_prompt="To be, or not to<mask>"))
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.5
    assert 0 <= summary["majority_accuracy"] < 0.5 and summary["eval_masked_tokens"] > 100
    assert len(summary["sample"]["top"]) == 5
    assert "most-frequent-token baseline" in capsys.readouterr().out
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert type(model).__name__ == "BertForMaskedLM" and model.config.vocab_size == 300


@pytest.mark.learning
def test_continued_pretraining_from_base_model(corpus: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """base_model + completion datasets: the pretrained weights and tokenizer, the same recipe."""
    from transformers import AutoModelForCausalLM

    config = tiny(corpus, tmp_path / "out", base_model=str(tiny_model_dir), max_steps=10,
                  datasets=[{"path": str(corpus), "type": "completion"}])
    for key in ("model_config", "tokenizer_train", "pretraining_dataset"):
        del config[key]
    summary = run(tmp_path, config)
    assert summary["eval_loss"] < summary["eval_loss_start"]
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert after.config.hidden_size == before.config.hidden_size == 32  # the base model's shape, not a preset's
    assert not after.model.embed_tokens.weight.equal(before.model.embed_tokens.weight)


def test_either_base_model_or_model_config(tmp_path: Path, corpus: Path) -> None:
    config = tiny(corpus, tmp_path / "out")
    del config["model_config"]
    with pytest.raises(LmforgeError, match="base_model.*model_config"):
        load_config(str(write_config(tmp_path / "c.yml", config)))
    with pytest.raises(LmforgeError, match="base_model and model_config are both set"):
        load_config(str(write_config(tmp_path / "c.yml", {**tiny(corpus, tmp_path), "base_model": "org/model"})), check_paths=False)


def test_datasets_still_required_for_fine_tuning(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="datasets is required"):
        load_config(str(write_config(tmp_path / "c.yml", {"base_model": "org/model"})), check_paths=False)
    with pytest.raises(LmforgeError, match="needs pretraining data"):
        load_config(str(write_config(tmp_path / "c.yml", {"model_config": {"architecture": "llama", "preset": "tiny"}})))


def test_unknown_architecture_fails_before_any_work(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(LmforgeError, match="unknown architecture 'lama'.*llama"):
        run(tmp_path, tiny(corpus, out, model_config={"architecture": "lama", "preset": "tiny"}))
    with pytest.raises(LmforgeError, match="'bert' has no causal LM head"):
        run(tmp_path, tiny(corpus, out, model_config={"architecture": "bert", "preset": "tiny"}))
    assert not out.exists()  # no tokenizer or shards were made for a config that cannot train


def test_unknown_key_in_tokenizer_train_is_named(tmp_path: Path, corpus: Path) -> None:
    config = tiny(corpus, tmp_path / "out")
    config["tokenizer_train"]["vocab_sise"] = 300
    with pytest.raises(LmforgeError, match="vocab_sise.*did you mean vocab_size"):
        load_config(str(write_config(tmp_path / "c.yml", config)))


def test_train_command_dispatches_pretraining_configs(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.recipes.pretrain as pretrain
    from lmforge.cli import main

    called = []
    monkeypatch.setattr(pretrain, "run_pretrain", lambda cfg: called.append(cfg.pretrain.objective))
    assert main(["train", str(write_config(tmp_path / "c.yml", tiny(corpus, tmp_path / "out")))]) == 0
    assert called == ["clm"]


def test_tokenizer_train_command_from_flags(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    from lmforge.cli import main

    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--files", str(corpus), "--vocab_size", "320", "--model_type", "unigram",
                 "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tokens/word" in printed and str(out) in printed
    assert json.loads((out / "lmforge_tokenizer_report.json").read_text())["vocab_size"] == 320
