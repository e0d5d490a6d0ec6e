"""`lmforge inference` with prompts on stdin: each answer under its prompt, or one JSON line per prompt."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import tiny_config, write_config
from lmforge.cli import main

PROMPTS = ["what is 1 plus 1 ?", "what is 2 plus 3 ?"]


@pytest.fixture()
def config(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(PROMPTS) + "\n\n"))
    return str(write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out")))


def test_each_answer_is_printed_under_its_prompt(config: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.recipes import inference

    real = inference.answer
    calls: list[str] = []

    def answer(model, tokenizer, prompt, out, **kwargs):  # noqa: ANN001, ANN202
        reply = real(model, tokenizer, prompt, out=io.StringIO(), **kwargs)  # the real generation, shown as a marker
        calls.append(reply)
        out.write(f"ANSWER-{len(calls)}\n")
        return reply

    monkeypatch.setattr(inference, "answer", answer)
    assert main(["inference", config, "--max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert out == f"### prompt 1: {PROMPTS[0]}\nANSWER-1\n\n### prompt 2: {PROMPTS[1]}\nANSWER-2\n"
    assert len(calls) == 2, "a blank stdin line is not a prompt"


def test_jsonl_prints_one_object_per_prompt(config: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["inference", config, "--max_new_tokens=4", "--jsonl"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in records] == PROMPTS
    assert all(isinstance(r["answer"], str) for r in records)
