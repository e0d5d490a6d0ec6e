"""Bad input through the real command line: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ARITHMETIC, tiny_config, write_config, write_jsonl


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture()
def setup(tiny_model_dir: Path, tmp_path: Path):  # noqa: ANN201
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    return tmp_path, tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=1)


def test_unknown_key(setup) -> None:  # noqa: ANN001
    tmp, cfg = setup
    path = write_config(tmp / "c.yml", {**cfg, "lora_rr": 8})
    assert_one_clear_line(run_cli("train", str(path), cwd=tmp), "c.yml:", "lora_rr", "did you mean lora_r?")


def test_wrong_type(setup) -> None:  # noqa: ANN001
    tmp, cfg = setup
    path = write_config(tmp / "c.yml", {**cfg, "learning_rate": "fast"})
    assert_one_clear_line(run_cli("train", str(path), cwd=tmp), "learning_rate", "'fast'")


def test_missing_dataset_file(setup) -> None:  # noqa: ANN001
    tmp, cfg = setup
    cfg["datasets"] = [{"path": str(tmp / "missing.jsonl"), "type": "alpaca"}]
    assert_one_clear_line(run_cli("train", str(write_config(tmp / "c.yml", cfg)), cwd=tmp), "missing.jsonl", "does not exist")


def test_row_missing_a_field(setup) -> None:  # noqa: ANN001
    tmp, cfg = setup
    data = write_jsonl(tmp / "bad.jsonl", ARITHMETIC[:3] + [{"instruction": "x", "response": "y"}])
    cfg["datasets"] = [{"path": str(data), "type": "alpaca"}]
    assert_one_clear_line(run_cli("train", str(write_config(tmp / "c.yml", cfg)), cwd=tmp), "bad.jsonl:4", "'output'", "instruction, response")


def test_model_path_does_not_exist(setup) -> None:  # noqa: ANN001
    tmp, cfg = setup
    cfg["base_model"] = str(tmp / "no-such-model")
    assert_one_clear_line(run_cli("train", str(write_config(tmp / "c.yml", cfg)), cwd=tmp), "model path does not exist")


def test_empty_dataset(setup) -> None:  # noqa: ANN001
    tmp, cfg = setup
    (tmp / "empty.jsonl").write_text("")
    cfg["datasets"] = [{"path": str(tmp / "empty.jsonl"), "type": "alpaca"}]
    assert_one_clear_line(run_cli("train", str(write_config(tmp / "c.yml", cfg)), cwd=tmp), "empty.jsonl", "no rows")


@pytest.mark.parametrize("value", [0, -1])
def test_sequence_len_not_positive(setup, value: int) -> None:  # noqa: ANN001
    tmp, cfg = setup
    path = write_config(tmp / "c.yml", {**cfg, "sequence_len": value})
    assert_one_clear_line(run_cli("train", str(path), cwd=tmp), "sequence_len", "greater than 0")


def test_debug_shows_the_traceback(setup) -> None:  # noqa: ANN001
    tmp, cfg = setup
    path = write_config(tmp / "c.yml", {**cfg, "lora_rr": 8})
    proc = run_cli("--debug", "train", str(path), cwd=tmp)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
