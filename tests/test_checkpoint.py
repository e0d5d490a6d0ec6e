"""Checkpoints: exact resume after SIGKILL, kills mid-write, corrupt files, SIGTERM, save_total_limit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_config, write_config
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.recipes.finetune import run_train
from lmforge.train.checkpoint import list_checkpoints, resolve_resume, verify_checkpoint


def _resume_config(tiny_model_dir: Path, alpaca_file: Path, out: Path, **extra: object) -> dict:
    # Full fine-tune, fp32, dropout on (so RNG state must resume too), accumulation, several epochs.
    settings = dict(adapter=None, learning_rate=0.003, lr_scheduler="cosine", warmup_steps=2, dropout=0.1,
                    gradient_accumulation_steps=2, max_steps=12, save_steps=2, val_set_size=4, eval_steps=4, logging_steps=1)
    return tiny_config(tiny_model_dir, alpaca_file, out, **{**settings, **extra})


def _cli(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", "train", str(config), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.005)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def test_sigkill_then_resume_auto_is_bit_identical(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run_train(load_config(str(write_config(tmp_path / "ref.yml", _resume_config(tiny_model_dir, alpaca_file, reference)))))

    out = tmp_path / "killed"
    config = write_config(tmp_path / "kill.yml", _resume_config(tiny_model_dir, alpaca_file, out))
    kill_after = random.choice([2, 4, 6])
    proc = _cli(config)
    _wait_for(out / f"checkpoint-{kill_after}", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before the kill: the test proves nothing"

    resumed = _cli(config, "--resume_from_checkpoint=auto")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert "resumed from" in log and "at step 0" not in log.split("resumed from")[1].split("\n")[0]
    _assert_same_weights(reference, out)
    # The histories continue across the kill too.
    import json

    ref_summary, summary = (json.loads((d / "summary.json").read_text()) for d in (reference, out))
    assert summary["eval_history"] == ref_summary["eval_history"]
    assert summary["total_tokens"] == ref_summary["total_tokens"]


KILL_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys, torch
    import lmforge.train.checkpoint as ck
    from lmforge.config import load_config
    from lmforge.recipes.finetune import run_train

    real_save = torch.save
    def save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            os.kill(os.getpid(), signal.SIGKILL)  # die with weights and optimizer half-way written
    torch.save = save
    run_train(load_config(sys.argv[1]))
    """
)


def test_kill_during_checkpoint_write_keeps_previous_loadable(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", _resume_config(tiny_model_dir, alpaca_file, out, max_steps=6, val_set_size=0, eval_steps=None))
    script = tmp_path / "kill_mid_write.py"
    script.write_text(KILL_MID_WRITE)
    proc = subprocess.run([sys.executable, str(script), str(config)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"], "a half-written checkpoint is visible"
    assert list(out.glob(".checkpoint-4.tmp-*")), "expected the abandoned temporary folder"
    assert resolve_resume("auto", out) == out / "checkpoint-2"
    # Resuming from it works and cleans the abandoned write away.
    summary = run_train(load_config(str(config), ["--resume_from_checkpoint=auto"]))
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["steps"] == 6
    assert not list(out.glob(".checkpoint-*.tmp-*"))


def test_corrupt_checkpoint_is_refused_by_name_and_auto_falls_back(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _resume_config(tiny_model_dir, alpaca_file, out, max_steps=7, val_set_size=0, eval_steps=None, save_total_limit=2)
    config = write_config(tmp_path / "c.yml", cfg)
    run_train(load_config(str(config)))
    # The final state (step 7) is a checkpoint too, within save_total_limit.
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-7", "checkpoint-6"], "save_total_limit keeps the newest 2"
    newest, older = out / "checkpoint-7", out / "checkpoint-6"
    for folder in (newest, older):
        verify_checkpoint(folder)
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "model.safetensors", "manifest.json"):
            assert (folder / name).is_file(), name

    # Garbled: one byte flipped in the optimizer state.
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="optimizer.pt") as err:
        resolve_resume(str(newest), out)
    assert "corrupt" in str(err.value)
    assert resolve_resume("auto", out) == older

    # Missing: the weights of the older one too -> nothing valid, auto starts fresh; an explicit path names the file.
    (older / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="model.safetensors.*missing"):
        resolve_resume(str(older), out)
    assert resolve_resume("auto", out) is None
    # And through the CLI: a clear one-line error, exit code 2.
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "train", str(config), f"--resume_from_checkpoint={newest}"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "optimizer.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_saves_a_checkpoint_then_exits(tiny_model_dir: Path, alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Steps never end on their own and no periodic saves: only the signal handler can write a checkpoint.
    config = write_config(tmp_path / "c.yml", _resume_config(tiny_model_dir, alpaca_file, out, max_steps=100_000, save_steps=None, val_set_size=0, eval_steps=None))
    proc = _cli(config)
    deadline = time.monotonic() + 120
    while not list(out.glob("events.out.tfevents.*")):  # the loop has started once the logger exists
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log[-2000:]
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1, log[-2000:]
    verify_checkpoint(checkpoints[0])
    step = int(checkpoints[0].name.split("-")[1])
    assert 0 < step < 100_000
    assert f"stopped at step {step}" in log
