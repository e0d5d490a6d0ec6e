"""tokenizer_use_mistral_common: Mistral's tokenizer file (tekken.json) read by mistral-common, conversations encoded
straight to ids, the loss on assistant turns, and the same ids at inference. Tested on a tiny random Mistral whose
tekken.json scripts/build_tiny_mistral.py writes; the reference is mistral-common itself, called directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import load_script, write_config, write_jsonl
from lmforge import cli
from lmforge.config import load_config
from lmforge.data.examples import IGNORE_INDEX
from lmforge.data.prepare import build
from lmforge.errors import LmforgeError
from lmforge.models.load import config_tokenizer

pytest.importorskip("mistral_common")

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is two plus two?"},
                  {"role": "assistant", "content": "four"}, {"role": "user", "content": "and three plus three?"},
                  {"role": "assistant", "content": "six"}]},
    {"messages": [{"role": "user", "content": "is the cat red?"}, {"role": "assistant", "content": "no, it is blue"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "think it over"}]},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "one and one"},
                                                    {"type": "text", "text": "two"}]}]},
]


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-mistral")
    load_script("build_tiny_mistral").build_tiny_mistral(folder)
    return folder


def _config(model: Path, data: Path, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    config = {"base_model": str(model), "tokenizer_use_mistral_common": True,
              "datasets": [{"path": str(data), "type": "chat_template"}], "sequence_len": 128, "micro_batch_size": 2,
              "max_steps": 2, "learning_rate": 0.001, "lr_scheduler": "constant", "bf16": False, "adapter": "lora",
              "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "output_dir": str(tmp_path / "out")}
    config.update(extra)
    return config


def _load(tmp_path: Path, model: Path, rows: list[dict] = CHATS, **extra: Any) -> Any:
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    return load_config(str(write_config(tmp_path / "config.yml", _config(model, data, tmp_path, **extra))))


def _reference(folder: Path, messages: list[dict]) -> tuple[Any, list[int]]:
    """mistral-common's own ids for a conversation (no transformers, no lmforge)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.from_file(str(folder / "tekken.json"), mode=ValidationMode.finetuning)
    return tokenizer, tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens


def _decode(tokenizer: Any, ids: list[int]) -> str:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    return tokenizer.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)


def test_chat_ids_are_mistral_commons_and_only_assistant_turns_are_trained(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    cfg = _load(tmp_path, tiny_mistral_dir)
    tokenizer = config_tokenizer(cfg)
    assert type(tokenizer).__name__ == "MistralCommonBackend" and not getattr(tokenizer, "chat_template", None)
    examples = build(cfg.data, tokenizer, seed=0).train
    by_length = {len(e.input_ids): e for e in examples}
    trained = {"four</s>six</s>", "no, it is blue</s>", "[THINK]one and one[/THINK]two</s>"}
    for row, expected in zip(CHATS, ("four</s>six</s>", "no, it is blue</s>", "[THINK]one and one[/THINK]two</s>")):
        reference, ids = _reference(tiny_mistral_dir, row["messages"])
        example = by_length[len(ids)]
        assert example.input_ids == ids  # exactly mistral-common's encoding: control tokens are ids, no template text
        labelled = [label for label in example.labels if label != IGNORE_INDEX]
        assert _decode(reference.instruct_tokenizer.tokenizer, labelled) == expected
        assert [t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX] == labelled
        trained.discard(expected)
    assert not trained
    # a rendered template, tokenized as text, would spell [INST] out in bytes: mistral-common's ids have it as one id
    inst = tokenizer.convert_tokens_to_ids("[INST]")
    assert all(inst in e.input_ids for e in examples)
    assert tokenizer("[INST]", add_special_tokens=False).input_ids != [inst]


def test_train_on_inputs_trains_every_token_and_train_on_eos_none_leaves_eos_out(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    every = _load(tmp_path, tiny_mistral_dir, CHATS[:1], train_on_inputs=True)
    example = build(every.data, config_tokenizer(every), seed=0).train[0]
    assert example.labels == example.input_ids
    rows = write_jsonl(tmp_path / "one.jsonl", CHATS[:1])
    no_eos = load_config(str(write_config(tmp_path / "no_eos.yml", _config(
        tiny_mistral_dir, rows, tmp_path, datasets=[{"path": str(rows), "type": "chat_template", "train_on_eos": "none"}]))))
    tokenizer = config_tokenizer(no_eos)
    example = build(no_eos.data, tokenizer, seed=0).train[0]
    labelled = [label for label in example.labels if label != IGNORE_INDEX]
    assert tokenizer.eos_token_id not in labelled and tokenizer.decode(labelled) == "foursix"


def test_a_tokenizer_that_moves_the_system_prompt_is_refused_rather_than_masked_wrong(tmp_path: Path) -> None:
    # a v3 tokenizer puts the system prompt in the last user turn: turn prefixes are not prefixes of the whole
    model = tmp_path / "v3"
    load_script("build_tiny_mistral").write_tekken(model, version="v3")
    (model / "config.json").write_text("{}", encoding="utf-8")
    cfg = _load(tmp_path, model, CHATS[:1])
    with pytest.raises(LmforgeError, match="differently from the whole") as caught:
        build(cfg.data, config_tokenizer(cfg), seed=0)
    assert "chats.jsonl:1" in caught.value.format() and "\n" not in caught.value.format()


def test_two_steps_train_and_inference_encodes_the_prompt_as_training_did(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    from lmforge.infer.prompts import PromptBuilder
    from lmforge.models.trained import load_for_generation
    from lmforge.recipes.finetune import run_train

    cfg = _load(tmp_path, tiny_mistral_dir)
    summary = run_train(cfg)
    out = Path(cfg.training.output_dir)
    assert summary["steps"] == 2 and (out / "checkpoint-2").is_dir()
    assert json.loads((out / "tekken.json").read_text()) == json.loads((tiny_mistral_dir / "tekken.json").read_text())

    loaded = load_for_generation(str(tiny_mistral_dir), str(out), mistral_common=True)
    assert type(loaded.tokenizer).__name__ == "MistralCommonBackend"
    builder = PromptBuilder.from_config(cfg, loaded.tokenizer, loaded.model)
    messages = CHATS[0]["messages"][:2]
    prompt = builder.conversation(messages)
    reference, whole = _reference(tiny_mistral_dir, CHATS[0]["messages"][:3])
    assert prompt.ids == whole[:len(prompt.ids)]
    # the prompt ends exactly where training's trained answer starts
    assert _decode(reference.instruct_tokenizer.tokenizer, whole[len(prompt.ids):]) == "four</s>"
    assert builder.stop_token_ids == [loaded.tokenizer.eos_token_id]

    from lmforge.infer.generate import Generator, Sampling

    generator = Generator(loaded.model, loaded.tokenizer, builder, Sampling(max_new_tokens=3))
    ids, _ = generator.encode(prompt, generator.sampling)
    assert ids == prompt.ids  # the ids themselves reach generate, not a re-tokenization of the prompt's text
    assert generator.complete(prompt).completion_tokens <= 3


def test_the_key_on_a_folder_without_a_mistral_tokenizer_file_is_one_line(tiny_model_dir: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    path = write_config(tmp_path / "config.yml", _config(tiny_model_dir, data, tmp_path))
    assert cli.main(["train", str(path)]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no Mistral tokenizer file (tekken.json" in errors[0] and "Traceback" not in err


@pytest.mark.parametrize("extra, key", [({"chat_template": "chatml"}, "chat_template"),
                                        ({"chat_template_jinja": "{{ messages }}"}, "chat_template_jinja"),
                                        ({"special_tokens": {"pad_token": "<pad>"}}, "special_tokens")])
def test_keys_that_conflict_are_refused_by_validate_naming_the_key(tiny_mistral_dir: Path, tmp_path: Path,
                                                                   extra: dict, key: str) -> None:
    with pytest.raises(LmforgeError) as caught:
        _load(tmp_path, tiny_mistral_dir, **extra)
    line = caught.value.format()
    assert key in line and "config.yml:" in line and "\n" not in line


def test_a_dataset_chat_template_is_refused_and_eot_tokens_is_warned(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    bad = _config(tiny_mistral_dir, data, tmp_path, datasets=[{"path": str(data), "type": "chat_template", "chat_template": "chatml"}])
    with pytest.raises(LmforgeError, match=r"datasets\[0\]\.chat_template sets a chat template"):
        load_config(str(write_config(tmp_path / "bad.yml", bad)))
    cfg = load_config(str(write_config(tmp_path / "eot.yml", _config(tiny_mistral_dir, data, tmp_path, eot_tokens=["<end_of_turn>"]))))
    assert any("eot_tokens changes nothing" in w for w in cfg.warnings)


@pytest.mark.parametrize("content, what", [
    ([{"type": "audio", "path": "clip.wav"}, {"type": "text", "text": "transcribe"}], "has audio"),
    ([{"type": "image", "path": "digit.png"}, {"type": "text", "text": "which digit?"}], "has images"),
])
def test_audio_and_image_rows_are_refused_in_one_line(tiny_mistral_dir: Path, tmp_path: Path, content: list, what: str) -> None:
    rows = [{"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}]
    cfg = _load(tmp_path, tiny_mistral_dir, rows)
    with pytest.raises(LmforgeError, match=what) as caught:
        build(cfg.data, config_tokenizer(cfg), seed=0)
    assert "chats.jsonl:1" in caught.value.format()


def test_without_the_key_a_mistral_folder_keeps_its_hugging_face_tokenizer(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    # tekken.json beside a Hugging Face tokenizer (as Mistral's Hub repos ship both): only the key switches to it
    from conftest import build_tiny_tokenizer
    from lmforge.models.load import load_tokenizer

    both = tmp_path / "both"
    load_script("build_tiny_mistral").write_tekken(both)
    build_tiny_tokenizer(both)
    assert type(load_tokenizer(str(both))).__name__ != "MistralCommonBackend"
    assert type(load_tokenizer(str(both), mistral_common=True)).__name__ == "MistralCommonBackend"


def test_an_instruction_format_trains_and_prompts_with_bos_as_an_id(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    from lmforge.infer.prompts import PromptBuilder

    rows = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "what is two plus two?", "input": "", "output": "four"}])
    cfg = load_config(str(write_config(tmp_path / "alpaca.yml", _config(
        tiny_mistral_dir, rows, tmp_path, datasets=[{"path": str(rows), "type": "alpaca"}]))))
    tokenizer = config_tokenizer(cfg)
    example = build(cfg.data, tokenizer, seed=0).train[0]
    prompt = PromptBuilder.from_config(cfg, tokenizer).single("what is two plus two?")
    assert example.input_ids[0] == tokenizer.bos_token_id and prompt.ids[0] == tokenizer.bos_token_id
    # the prompt is what training put before the trained response
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert prompt.ids == example.input_ids[:first_trained]


def test_serve_and_eval_encode_prompts_with_mistral_common(tiny_mistral_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.eval.heldout import held_out_examples
    from lmforge.infer.generate import Generator, Sampling
    from lmforge.infer.prompts import PromptBuilder
    from lmforge.infer.server import create_app
    from lmforge.models.trained import load_for_generation

    cfg = _load(tmp_path, tiny_mistral_dir, val_set_size=1)
    loaded = load_for_generation(str(tiny_mistral_dir), None, mistral_common=True)
    builder = PromptBuilder.from_config(cfg, loaded.tokenizer, loaded.model)
    generator = Generator(loaded.model, loaded.tokenizer, builder, Sampling(max_new_tokens=2))
    seen: list[list[int]] = []
    encode = generator.encode
    generator.encode = lambda prompt, sampling, where="prompt": (seen.append(encode(prompt, sampling, where)[0]) or encode(prompt, sampling, where))
    messages = [{"role": "user", "content": "is the cat red?"}]
    with TestClient(create_app(generator, "tiny")) as client:
        reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    _, reference = _reference(tiny_mistral_dir, CHATS[1]["messages"])
    assert seen == [reference[:len(seen[0])]] and reference[len(seen[0]) - 1] == loaded.tokenizer.convert_tokens_to_ids("[/INST]")

    examples, _ = held_out_examples(cfg, loaded.tokenizer, builder)
    (example,) = examples
    ids = example.prompt.ids  # the held-out prompt is mistral-common's ids up to the first trained answer
    assert ids[-1] == loaded.tokenizer.convert_tokens_to_ids("[/INST]")
    assert any(_reference(tiny_mistral_dir, r["messages"])[1][:len(ids)] == ids for r in CHATS)
    assert example.reference in ("four", "no, it is blue", "[THINK]one and one[/THINK]two") and generator.encode(example.prompt, generator.sampling)[0] == ids


DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits_vl" / "train.jsonl"


@pytest.fixture(scope="module")
def tiny_mistral3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("cv2")  # mistral-common's image encoder resizes with opencv
    folder = tmp_path_factory.mktemp("tiny-mistral3")
    load_script("build_tiny_mistral").build_tiny_mistral3(folder)
    return folder


def _digit_rows(n: int) -> list[dict]:
    with DIGITS.open(encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def _vision(tmp_path: Path, model: Path, rows: list[dict], **extra: Any) -> Any:
    return _load(tmp_path, model, rows, processor_type="AutoProcessor", sample_packing=False, lora_target_modules=
                 r"model.language_model.layers.[\d]+.(mlp|self_attn).(up|down|gate|q|k|v|o)_proj", lora_target_linear=None,
                 **extra)


def test_image_rows_are_encoded_with_their_pixels_by_mistral_common(tiny_mistral3_dir: Path, tmp_path: Path) -> None:
    import torch

    from lmforge.data.batching import collate
    from lmforge.models.load import config_processor, load_model
    from lmforge.train.objectives import objective_from_config

    rows = _digit_rows(3)
    cfg = _vision(tmp_path, tiny_mistral3_dir, rows)
    tokenizer = config_tokenizer(cfg)
    processor = config_processor(cfg, tokenizer)
    assert processor is tokenizer  # mistral-common encodes the images itself: no Hugging Face processor
    examples = build(cfg.data, tokenizer, seed=0, processor=processor).train
    image = tokenizer.convert_tokens_to_ids("[IMG]")
    for example, row in zip(examples, rows):
        assert example.images["pixel_values"].shape == (1, 3, 32, 32) and example.images["image_sizes"].tolist() == [[32, 32]]
        assert example.input_ids.count(image) == 4  # 32x32 pixels, 8-pixel patches merged 2x2
        labelled = [t for t in example.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(labelled, skip_special_tokens=True) == row["answer"] and labelled[-1] == tokenizer.eos_token_id
        assert image not in labelled  # image tokens are never trained

    # the pixels reach the model: the same tokens with blank images give another loss
    model = load_model(str(tiny_mistral3_dir), image_text=True)
    objective = objective_from_config(cfg)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        seen = objective(model, batch)[0]
        blank = objective(model, {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})[0]
    assert not torch.allclose(seen, blank)


def test_image_text_model_trains_two_steps_with_the_key(tiny_mistral3_dir: Path, tmp_path: Path) -> None:
    from lmforge.recipes.finetune import run_train

    cfg = _vision(tmp_path, tiny_mistral3_dir, _digit_rows(4))
    summary = run_train(cfg)
    out = Path(cfg.training.output_dir)
    assert summary["steps"] == 2 and (out / "adapter_model.safetensors").is_file() and (out / "tekken.json").is_file()


def test_image_rows_for_a_text_mistral_and_a_text_tokenizer_under_processor_type_are_one_line(
        tiny_mistral_dir: Path, tmp_path: Path) -> None:
    from lmforge.models.load import config_processor

    cfg = _vision(tmp_path, tiny_mistral_dir, _digit_rows(1))
    with pytest.raises(LmforgeError, match="no image settings"):
        config_processor(cfg, config_tokenizer(cfg))


def test_inference_with_an_image_encodes_it_as_training_did(tiny_mistral3_dir: Path, tmp_path: Path) -> None:
    from lmforge.data.images import open_image
    from lmforge.infer.generate import Generator, Sampling
    from lmforge.infer.prompts import PromptBuilder
    from lmforge.models.trained import load_for_generation

    row = _digit_rows(1)[0]
    cfg = _vision(tmp_path, tiny_mistral3_dir, [row])
    tokenizer = config_tokenizer(cfg)
    from lmforge.models.load import config_processor

    (example,) = build(cfg.data, tokenizer, seed=0, processor=config_processor(cfg, tokenizer)).train
    loaded = load_for_generation(str(tiny_mistral3_dir), None, processor=cfg, mistral_common=True)
    generator = Generator(loaded.model, loaded.tokenizer, PromptBuilder.from_config(cfg, loaded.tokenizer, loaded.model),
                          Sampling(max_new_tokens=2), processor=loaded.processor)
    picture = open_image(row["messages"][0]["content"][0]["base64"], "row image")
    prompt = generator.image_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is this?"}]}])
    ids, pixels, _ = generator.encode_images(prompt, [picture], generator.sampling)
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert ids == example.input_ids[:first_trained]  # the prompt training saw before the answer, image tokens included
    assert torch_equal(pixels["pixel_values"], example.images["pixel_values"])
    stream = generator.stream(prompt, images=[picture])
    for _ in stream:  # the model generates with the pixels beside the ids
        pass
    assert stream.prompt_tokens == len(ids) and 1 <= stream.completion_tokens <= 2


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.float(), b.float()))
