"""Quiet by default (issues 15.8, 21.6): the libraries' progress bars and warnings only with --verbose; lmforge's own lines stay."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ARITHMETIC, REPO, tiny_config, write_config, write_jsonl

NOISE = ("Loading weights", "it/s]", "FutureWarning", "DeprecationWarning", "Generating train split")


def _inference(config: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_", "TQDM_"))}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", "inference", str(config), "--prompt=what is 1 plus 2 ?",
                           "--max_new_tokens=2", *flags], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)


def test_library_bars_and_warnings_hidden_unless_verbose(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, data, tmp_path / "out"))
    quiet = _inference(config)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip(), "the answer is printed"
    assert not [n for n in NOISE if n in quiet.stderr], quiet.stderr
    loud = _inference(config, "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr, loud.stderr  # --verbose shows what the default hides


# lmforge's own voice: its prefixed lines, the config's notices and warnings, and its training bar.
OWN_LINE = re.compile(r"^(\[lmforge\] |notice: |warning: |train: )")


def third_party_lines(output: str) -> list[str]:
    """Every non-blank line (progress bars redraw with \\r) that lmforge did not write."""
    lines = (line.strip() for line in output.replace("\r", "\n").splitlines())
    return [line for line in lines if line and not OWN_LINE.match(line)]


def _lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command as a user starts it: a fresh process (DeepSpeed speaks when first imported), no quieting env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_", "TQDM_")) and k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A 4-step LoRA run of a tiny byte-level BPE model (GGUF-exportable) whose vocabulary grows by one token, so
    the embeddings are resized and saved with the adapter (what made peft warn); (folder, config, the run)."""
    from test_export_gguf import make_model

    folder = tmp_path_factory.mktemp("quiet")
    model = make_model(folder / "model")
    chats = [{"messages": [{"role": "user", "content": f"what is {a} plus {b} ?"}, {"role": "assistant", "content": str(a + b)}]}
             for a in range(1, 6) for b in range(1, 5)]
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    config = write_config(folder / "c.yml", tiny_config(Path(model), data, folder / "out", max_steps=4, sequence_len=128,
                                                        tokens=["<extra>"], datasets=[{"path": str(data), "type": "chat_template"}]))
    return folder, config, _lmforge("train", str(config), cwd=folder)


def test_train_prints_no_library_lines(trained: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    folder, _, run = trained
    assert run.returncode == 0, run.stderr[-3000:]
    assert (folder / "out" / "adapter_model.safetensors").is_file() and "[lmforge] done: 4 steps" in run.stdout
    assert "embeddings grow" in run.stdout or "tokens were added" in run.stdout  # lmforge says it, once, itself
    assert third_party_lines(run.stdout + run.stderr) == []  # peft's two-line save_embedding_layers warning was here


def test_merge_lora_prints_no_library_lines(trained: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    folder, config, run = trained
    assert run.returncode == 0, run.stderr[-3000:]
    merged = _lmforge("merge-lora", str(config), "--output_dir_merged", str(folder / "merged"), cwd=folder)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (folder / "merged" / "model.safetensors").is_file() and "[lmforge] merged" in merged.stdout
    assert third_party_lines(merged.stdout + merged.stderr) == []  # DeepSpeed's "Setting accelerator to CPU" was here
    loud = _lmforge("merge-lora", str(config), "--output_dir_merged", str(folder / "merged-loud"), "--verbose", cwd=folder)
    assert loud.returncode == 0 and third_party_lines(loud.stdout + loud.stderr), "--verbose shows the libraries again"


def test_export_prints_no_library_lines(trained: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    folder, config, run = trained
    assert run.returncode == 0, run.stderr[-3000:]
    exported = _lmforge("export", str(config), "--lora_model_dir", str(folder / "out"), "--output", str(folder / "m.gguf"),
                        "--tokenizer_pre", "gpt-2", cwd=folder)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (folder / "m.gguf").is_file() and "fidelity vs the unquantized model" in exported.stdout
    assert third_party_lines(exported.stdout + exported.stderr) == []


@pytest.mark.slow  # a torchrun launch of two ranks (~1 min on 2 cores); runs in CI's full suite
def test_train_on_two_ranks_prints_no_library_lines_and_keeps_its_data_in_the_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, data, out, max_steps=4))
    run = _lmforge("train", str(config), "--nproc", "2", cwd=tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "DDP on 2 rank(s)" in run.stdout and "[lmforge] done: 4 steps" in run.stdout
    assert third_party_lines(run.stdout + run.stderr) == []  # torchrun's four-line OMP_NUM_THREADS banner was here
    # rank 0 shares the prepared data with the others through the run's own folder, not ./last_run_prepared
    assert not (tmp_path / "last_run_prepared").exists()
    assert list((out / "prepared_data").glob("*/train_input_ids.npy"))
