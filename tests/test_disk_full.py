"""A disk that fills up while a checkpoint is saved (issue 15.4): one error naming the folder and saying the
disk is full; the previous checkpoint stays loadable and a rerun resumes from it.

The full disk is a small tmpfs this test mounts (it needs root or CAP_SYS_ADMIN; skipped with the
reason otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ARITHMETIC, tiny_config, write_config, write_jsonl
from fuzz_helpers import run_cli
from lmforge.train.checkpoint import list_checkpoints, verify_checkpoint


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to make a size-limited folder")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` to the last `leave` bytes with one file."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 16))
                handle.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_disk_full_while_saving_names_the_folder_and_resume_uses_the_last_checkpoint(
        small_disk: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    out = small_disk / "out"
    # Full fine-tuning: a checkpoint holds the weights and the optimizer state, far more than the last bytes left.
    config = tiny_config(tiny_model_dir, data, out, adapter=None, max_steps=2, save_steps=1, learning_rate=0.001)
    first = run_cli(["train", str(write_config(tmp_path / "c.yml", config))])
    assert first.code == 0, first.err
    last = out / "checkpoint-2"
    verify_checkpoint(last)

    filler = _fill(small_disk, leave=_folder_bytes(last) // 3)
    longer = write_config(tmp_path / "longer.yml", {**config, "max_steps": 4, "resume_from_checkpoint": "auto"})
    full = run_cli(["train", str(longer)])
    assert full.code == 2 and len(full.error_lines) == 1, full.err
    line = full.error_lines[0]
    assert "disk is full" in line and str(out) in line, line
    assert "Traceback" not in full.err
    # Nothing half-written is visible; the previous checkpoint still verifies.
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-1"]
    verify_checkpoint(last)
    assert not list(out.glob(".checkpoint-*.tmp-*"))

    filler.unlink()
    resumed = run_cli(["train", str(longer)])
    assert resumed.code == 0, resumed.err
    assert "checkpoint-2" in resumed.out + resumed.err
    assert [p.name for p in list_checkpoints(out)][0] == "checkpoint-4"
