"""`inference --chat` in a pseudo-terminal: two turns, /undo, /retry, /save; the saved file trains as a chat_template dataset."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infer_helpers import tiny_infer_config

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


class Terminal:
    """A program on a pseudo-terminal: type lines, read until a pattern shows."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True)
        os.close(slave)
        self.screen = ""

    def read_until(self, pattern: str, timeout: float = 120.0) -> str:
        """Everything up to and including the next `pattern`, consumed."""
        deadline = time.monotonic() + timeout
        while pattern not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen so far:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the program exited
                    data = b""
                if not data and self.proc.poll() is not None:
                    raise AssertionError(f"the chat exited with {self.proc.returncode} before {pattern!r}:\n{self.screen}")
                self.screen += ANSI.sub("", data.decode("utf-8", "replace"))
        at = self.screen.index(pattern) + len(pattern)
        seen, self.screen = self.screen[:at], self.screen[at:]
        return seen

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            os.close(self.master)


def _answer(seen: str) -> str:
    """The assistant's text in a screenful that ends at the next prompt."""
    return seen.split("assistant> ", 1)[1].rsplit("\nyou> ", 1)[0].strip("\n")


def test_terminal_chat_two_turns_undo_save_and_train_on_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infer_helpers import TINY_CHAT_TEMPLATE
    from lmforge.config import load_config
    from lmforge.recipes.finetune import run_train

    config = tiny_infer_config(tmp_path, tiny_model_dir, chat=True, max_steps=2)
    saved = tmp_path / "chats.jsonl"  # the config's dataset path: what /save writes, training reads
    term = Terminal([sys.executable, "-m", "lmforge.cli", "inference", str(config), "--chat", "--max_new_tokens", "10",
                     "--save", str(saved)], cwd=tmp_path)
    try:
        banner = term.read_until("you> ")
        assert "renders the whole conversation with the chat template" in banner
        term.type("what is two plus two ?")
        first = _answer(term.read_until("you> "))
        term.type("and three ?")
        second = _answer(term.read_until("you> "))
        assert first and second
        term.type("/retry")
        retried = term.read_until("you> ")
        assert "/retry samples at temperature 0.7" in retried and _answer(retried)  # greedy would repeat itself
        term.type("/undo")
        assert "removed the last exchange (1 left)" in term.read_until("you> ")
        term.type("/save")
        assert "appended this conversation (1 exchanges)" in term.read_until("you> ")
        term.type("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()

    # Each turn re-applied the training format: the second answer is what the model says to the whole
    # conversation rendered by transformers' own apply_chat_template.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    history = [{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and three ?"}]
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == second.strip()

    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert rows == [{"messages": [{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": first}]}]

    cfg = load_config(str(config))
    run_train(cfg)
    summary = json.loads((Path(cfg.training.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 2 and (Path(cfg.training.output_dir) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("command,expected", [("/undo", "nothing to undo"), ("/save", "nothing to save yet"), ("/bogus", "unknown command")])
def test_chat_commands_on_an_empty_conversation(tiny_model_dir: Path, tmp_path: Path, command: str, expected: str) -> None:
    import io

    from lmforge.config import load_config
    from lmforge.infer.chat import run_chat
    from lmforge.recipes.inference import SamplingFlags, build_generator

    gen = build_generator(load_config(str(tiny_infer_config(tmp_path, tiny_model_dir)), [], check_paths=False), flags=SamplingFlags(max_new_tokens=4))
    lines = iter([command, "/exit"])
    out = io.StringIO()
    session = run_chat(gen, save_path=str(tmp_path / "c.jsonl"), read=lambda _: next(lines), out=out)
    assert expected in out.getvalue() and session.messages == []
    assert "answered without the earlier turns" in out.getvalue()  # an alpaca config says what its chat does


def test_ctrl_c_stops_the_answer_and_keeps_what_was_said(tiny_model_dir: Path, tmp_path: Path) -> None:
    import io

    from lmforge.config import load_config
    from lmforge.infer.chat import run_chat
    from lmforge.recipes.inference import SamplingFlags, build_generator

    gen = build_generator(load_config(str(tiny_infer_config(tmp_path, tiny_model_dir)), [], check_paths=False), flags=SamplingFlags(max_new_tokens=20))
    real_stream = gen.stream

    class Interrupted:
        """The real stream, with Ctrl-C pressed after two pieces."""

        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            self.inner = real_stream(*args, **kwargs)
            self.text = ""

        def __iter__(self):  # noqa: ANN204
            for n, piece in enumerate(self.inner):
                if n == 2:
                    raise KeyboardInterrupt
                self.text += piece
                yield piece

        def cancel(self) -> None:
            self.inner.cancel()

    gen.stream = Interrupted  # type: ignore[method-assign]
    lines = iter(["what is two plus two ?", "/exit"])
    out = io.StringIO()
    session = run_chat(gen, save_path=str(tmp_path / "c.jsonl"), read=lambda _: next(lines), out=out)
    assert "(stopped; /retry answers again)" in out.getvalue()
    assert session.messages[-1]["role"] == "assistant" and session.messages[-1]["content"]
    assert len(session.messages[-1]["content"].split()) <= 2


def test_retry_under_greedy_decoding_samples_and_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Greedy decoding gives one answer, so a /retry that decodes greedily again changes nothing: it samples."""
    import io

    from lmforge.config import load_config
    from lmforge.infer.chat import RETRY_TEMPERATURE, run_chat
    from lmforge.recipes.inference import SamplingFlags, build_generator

    gen = build_generator(load_config(str(tiny_infer_config(tmp_path, tiny_model_dir)), [], check_paths=False),
                          flags=SamplingFlags(max_new_tokens=8, seed=3))
    assert gen.sampling.temperature == 0  # the chat itself is greedy
    used = []
    real_stream = gen.stream

    def recording(prompt, sampling=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        used.append(sampling or gen.sampling)
        return real_stream(prompt, sampling, *args, **kwargs)

    gen.stream = recording  # type: ignore[method-assign]
    lines = iter(["what is two plus two ?", "/retry", "/retry", "/exit"])
    out = io.StringIO()
    run_chat(gen, save_path=str(tmp_path / "c.jsonl"), read=lambda _: next(lines), out=out)
    assert [s.temperature for s in used] == [0, RETRY_TEMPERATURE, RETRY_TEMPERATURE]
    assert len({s.seed for s in used}) == 3  # one seed would sample one answer every time
    notes = [line for line in out.getvalue().splitlines() if "greedy decoding repeats itself" in line]
    assert len(notes) == 2 and "temperature 0.7" in notes[0] and "--temperature" in notes[0]
