"""Interrupted and extended runs: SIGINT/SIGTERM at a random step then resume, a second Ctrl-C, the final
checkpoint that lets a finished run be extended, and the output_dir lock.

The signals are real (os.kill on this process, delivered to the handler the run installs) and the runs go
through `lmforge.cli.main`, so the exit codes are the ones a user sees; in-process keeps the tests fast.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, write_config
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.recipes.finetune import run_train
from lmforge.train.checkpoint import list_checkpoints, resolve_resume, verify_checkpoint
from lmforge.train.runlock import LOCK_NAME, RunLock, _start_time


def _config(tiny_model_dir: Path, alpaca_file: Path, out: Path, **extra: object) -> dict:
    # Full fine-tune with dropout (RNG state must resume too), accumulation, an eval set and several epochs.
    settings = dict(adapter=None, learning_rate=0.003, lr_scheduler="cosine", warmup_steps=2, dropout=0.1,
                    gradient_accumulation_steps=2, max_steps=12, save_steps=4, val_set_size=4, eval_steps=4, logging_steps=1)
    return tiny_config(tiny_model_dir, alpaca_file, out, **{**settings, **extra})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def _signal_at(monkeypatch: pytest.MonkeyPatch, step: int, *signals: signal.Signals) -> None:
    """Send `signals` to this process when the loop logs `step` (the handler runs right then, mid-run)."""
    import lmforge.recipes.run as training

    real = training._RunCallbacks.on_log

    def on_log(self, at: int, metrics: dict) -> None:  # noqa: ANN001
        real(self, at, metrics)
        if at == step and "loss" in metrics:
            for sig in signals:
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(training._RunCallbacks, "on_log", on_log)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of the uninterrupted run."""
    from conftest import ARITHMETIC, write_jsonl

    folder = tmp_path_factory.mktemp("reference")
    data = write_jsonl(folder / "arith.jsonl", ARITHMETIC)
    run_train(load_config(str(write_config(folder / "c.yml", _config(tiny_model_dir, data, folder / "out")))))
    return _weights(folder / "out")


@pytest.fixture()
def same_data(tmp_path: Path) -> Path:
    from conftest import ARITHMETIC, write_jsonl

    return write_jsonl(tmp_path / "arith.jsonl", ARITHMETIC)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_resumes_to_the_end(sig: signal.Signals, tiny_model_dir: Path, same_data: Path, tmp_path: Path,
                                            reference: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    config = str(write_config(tmp_path / "c.yml", _config(tiny_model_dir, same_data, out)))
    step = random.randint(2, 10)
    with monkeypatch.context() as patch:
        _signal_at(patch, step, sig)
        assert main(["train", config]) == 130
    assert (out / f"checkpoint-{step}").is_dir() and f"stopped at step {step}" in capsys.readouterr().out
    assert not (out / "summary.json").exists() and not (out / LOCK_NAME).exists()

    # The resumed run completes (exit 0, every output), and so does any rerun: the old stop reason is gone.
    assert main(["train", config, "--resume_from_checkpoint=auto"]) == 0
    for name in ("model.safetensors", "summary.json", "summary.md", "loss_curves.png", "config.yml"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stop_reason"] is None
    assert summary["resumed_from"] == str(out / f"checkpoint-{step}")
    _assert_same(reference, _weights(out))
    assert main(["train", config, "--resume_from_checkpoint=auto"]) == 0


def test_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(tiny_model_dir: Path, same_data: Path, tmp_path: Path,
                                                                   reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    config = str(write_config(tmp_path / "c.yml", _config(tiny_model_dir, same_data, out)))
    with monkeypatch.context() as patch:
        _signal_at(patch, 9, signal.SIGINT, signal.SIGINT)  # Ctrl-C twice: no checkpoint of step 9
        assert main(["train", config]) == 130
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-8", "checkpoint-4"]
    assert not (out / LOCK_NAME).exists()
    assert main(["train", config, "--resume_from_checkpoint=auto"]) == 0
    _assert_same(reference, _weights(out))


def test_second_ctrl_c_during_the_save_leaves_no_partial_checkpoint(tiny_model_dir: Path, same_data: Path, tmp_path: Path,
                                                                    reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    config = str(write_config(tmp_path / "c.yml", _config(tiny_model_dir, same_data, out)))
    real_save = torch.save

    def save(obj, path, *args, **kwargs):  # noqa: ANN001, ANN202
        real_save(obj, path, *args, **kwargs)
        if "checkpoint-6" in str(path) and str(path).endswith("optimizer.pt"):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C lands while the first one's checkpoint is written

    with monkeypatch.context() as patch:
        _signal_at(patch, 6, signal.SIGINT)
        patch.setattr(torch, "save", save)
        assert main(["train", config]) == 130
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert not list(out.glob(".checkpoint-*")), "a partial checkpoint was left behind"
    verify_checkpoint(out / "checkpoint-4")
    assert resolve_resume("auto", out) == out / "checkpoint-4"
    assert main(["train", config, "--resume_from_checkpoint=auto"]) == 0
    _assert_same(reference, _weights(out))


def test_finished_run_ends_with_a_checkpoint_and_can_be_extended(tiny_model_dir: Path, same_data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    # Constant rate, no warm-up: 4 steps then 2 more is the same schedule as 6 at once.
    settings = dict(lr_scheduler="constant", warmup_steps=None, save_steps=3, save_total_limit=2, eval_steps=None)
    straight = tmp_path / "straight"
    run_train(load_config(str(write_config(tmp_path / "s.yml", _config(tiny_model_dir, same_data, straight, max_steps=6, **settings)))))

    out = tmp_path / "out"
    config = str(write_config(tmp_path / "c.yml", _config(tiny_model_dir, same_data, out, max_steps=4, **settings)))
    run_train(load_config(config))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-3"]
    capsys.readouterr()
    summary = run_train(load_config(config, ["--max_steps=6", "--resume_from_checkpoint=auto"]))
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in capsys.readouterr().out
    assert summary["steps"] == 6 and summary["total_tokens"] == json.loads((straight / "summary.json").read_text())["total_tokens"]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-4"]  # within save_total_limit
    _assert_same(_weights(straight), _weights(out))


# ----------------------------------------------------------------------------- the output_dir lock


def _write_lock(folder: Path, pid: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": _start_time(pid), "command": "lmforge train x.yml"}))
    return lock


def test_a_second_run_on_the_same_output_dir_is_refused(tiny_model_dir: Path, same_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    config = str(write_config(tmp_path / "c.yml", _config(tiny_model_dir, same_data, out, max_steps=2)))
    other = subprocess.Popen(["sleep", "60"])  # a live process holding the lock, as a running `lmforge train` would
    try:
        _write_lock(out, other.pid)
        assert main(["train", config]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run (pid {other.pid}" in err[0] and "another output_dir" in err[0]
        assert not list_checkpoints(out), "the refused run wrote into the folder"
        assert main(["pretrain", config]) == 2  # every training command takes the same lock
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_with_a_notice(tiny_model_dir: Path, same_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    out = tmp_path / "out"
    lock = _write_lock(out, gone.pid)
    config = str(write_config(tmp_path / "c.yml", _config(tiny_model_dir, same_data, out, max_steps=2)))
    assert main(["train", config]) == 0
    assert f"taking over a stale lock on {out} (pid {gone.pid} is no longer running)" in capsys.readouterr().out
    assert not lock.exists(), "the lock outlived the run"


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path, say=lambda _: None)
    first.acquire()
    owner = json.loads((tmp_path / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["started"] == _start_time(os.getpid())
    other = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(tmp_path, other.pid)  # as if another process had won the race
        with pytest.raises(LmforgeError, match="in use by another run"):
            RunLock(tmp_path, say=lambda _: None).acquire()
    finally:
        other.kill()
        other.wait()
    first.release()  # not ours any more: left alone
    assert (tmp_path / LOCK_NAME).exists()


def test_sigterm_before_the_loop_exits_130_and_frees_the_lock(tiny_model_dir: Path, same_data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.recipes.finetune as recipe

    real = recipe.prepare

    def prepare(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        os.kill(os.getpid(), signal.SIGTERM)  # while the data is being prepared, before any handler of the loop
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "prepare", prepare)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", str(write_config(tmp_path / "c.yml", _config(tiny_model_dir, same_data, out)))]) == 130
    assert not (out / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is before, "the run left its SIGTERM handler installed"


def test_a_fresh_run_over_old_checkpoints_saves_its_own(tiny_model_dir: Path, same_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    settings = dict(max_steps=4, save_steps=2, eval_steps=None)
    run_train(load_config(str(write_config(tmp_path / "a.yml", _config(tiny_model_dir, same_data, out, **settings)))))
    old = _weights(out / "checkpoint-4")
    run_train(load_config(str(write_config(tmp_path / "b.yml", _config(tiny_model_dir, same_data, out, learning_rate=0.01, **settings)))))
    assert "holds checkpoints of an earlier run (checkpoint-4, checkpoint-2)" in capsys.readouterr().out
    new = _weights(out / "checkpoint-4")
    _assert_same(new, _weights(out))
    assert not all(torch.equal(old[k], new[k]) for k in old), "checkpoint-4 still holds the earlier run's weights"
