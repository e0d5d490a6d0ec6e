"""Quiet by default (issue 15.8): the libraries' progress bars and warnings only with --verbose; lmforge's own lines stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
