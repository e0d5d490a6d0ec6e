"""CPU threads on a busy machine (lmforge/train/threads.py): the choice, the probe, the CLI's one-line notice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, write_config
from lmforge.cli import main
from lmforge.train import threads
from lmforge.train.threads import busy_cores, choose_threads, explicit_threads, settle_threads


def test_a_busy_core_makes_the_team_wait_passively_and_says_so() -> None:
    choice = choose_threads(2, busy=1, configured=None, env={}, torch_loaded=False)
    assert (choice.threads, choice.set_threads, choice.passive_wait) == (2, None, True)
    assert "1 of 2 cores is busy" in choice.notice and "OMP_WAIT_POLICY=PASSIVE" in choice.notice
    assert "torch_threads" in choice.notice and "OMP_NUM_THREADS" in choice.notice and "\n" not in choice.notice


def test_an_idle_machine_is_left_as_it_is() -> None:
    assert choose_threads(2, busy=0, configured=None, env={}, torch_loaded=False) == threads.ThreadChoice(2, None, False, None)
    assert choose_threads(2, busy=None, configured=None, env={}, torch_loaded=False).notice is None  # no probe: no claim


def test_explicit_counts_win_and_one_thread_never_contends() -> None:
    assert explicit_threads(None, {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert explicit_threads(2, {"OMP_NUM_THREADS": "3"}) == (2, "torch_threads")  # the config is the more specific
    assert explicit_threads(None, {"OMP_NUM_THREADS": "4,2"}) == (4, "OMP_NUM_THREADS")  # OpenMP's per-level list
    assert explicit_threads(None, {"OMP_NUM_THREADS": "lots"}) == (None, None)
    one = choose_threads(2, busy=2, configured=None, env={"OMP_NUM_THREADS": "1"}, torch_loaded=False)
    assert (one.threads, one.set_threads, one.passive_wait, one.notice) == (1, None, False, None)
    configured = choose_threads(2, busy=1, configured=2, env={"OMP_NUM_THREADS": "1"}, torch_loaded=False)
    assert configured.set_threads == 2 and configured.passive_wait and "torch_threads=2 as set" in configured.notice
    # 4 threads on 16 cores with one busy: the team has free cores enough
    assert choose_threads(16, busy=1, configured=None, env={"OMP_NUM_THREADS": "4"}, torch_loaded=False).notice is None


def test_a_wait_policy_the_user_set_or_a_loaded_torch_is_not_overridden() -> None:
    active = choose_threads(2, busy=1, configured=None, env={"OMP_WAIT_POLICY": "ACTIVE"}, torch_loaded=False)
    assert not active.passive_wait and "OMP_WAIT_POLICY=ACTIVE as set" in active.notice
    assert "torch_threads: 1 or OMP_NUM_THREADS=1" in active.notice
    loaded = choose_threads(2, busy=1, configured=None, env={}, torch_loaded=True)
    assert not loaded.passive_wait and "torch was already loaded" in loaded.notice


def test_busy_cores_reads_the_kernels_per_core_counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = tmp_path / "stat"
    #                        user nice system idle iowait irq softirq steal
    stat.write_text("cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 900 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n")
    # over the probe core 0 ran 9 of 10 ticks (busy), core 1 idled 8 of 10 (free); core 2 is outside the affinity
    later = "cpu  0 0 0 0 0 0 0 0\ncpu0 108 0 1 901 0 0 0 0\ncpu1 101 0 1 906 2 0 0 0\ncpu2 10 0 0 0 0 0 0 0\n"
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: stat.write_text(later))
    assert busy_cores({0, 1}, stat=stat) == 1
    stat.write_text("cpu0 1 2 3 4\n")
    assert busy_cores({0, 1}, stat=stat) is None  # a core the kernel does not list: no claim
    assert busy_cores({0}, stat=tmp_path / "missing") is None


def test_settle_sets_the_wait_policy_before_torch_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: {0, 1})
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 1)
    monkeypatch.setattr(threads, "_torch_loaded", lambda: False)
    env: dict[str, str] = {}
    assert settle_threads(None, env).passive_wait and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not settle_threads(None, env).passive_wait and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    monkeypatch.setattr(threads, "busy_cores", lambda cores: pytest.fail("one thread never waits on a team: no probe"))
    assert settle_threads(None, {"OMP_NUM_THREADS": "1"}).notice is None


@pytest.fixture
def clean_thread_env(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """No OMP_* from the caller's shell, and whatever the test sets is undone; torch's thread count restored."""
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_train_prints_one_line_naming_the_knobs_when_a_core_is_busy(clean_thread_env: pytest.MonkeyPatch, tiny_model_dir: Path,
                                                                    alpaca_file: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    import lmforge.recipes.finetune

    monkeypatch = clean_thread_env
    monkeypatch.setattr(threads, "usable_cores", lambda: {0, 1})
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 1)
    monkeypatch.setattr(threads, "_torch_loaded", lambda: False)
    seen: list[int] = []
    monkeypatch.setattr(lmforge.recipes.finetune, "run_train", lambda cfg: seen.append(torch.get_num_threads()))
    config = write_config(tmp_path / "c.yml", tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out"))
    assert main(["train", str(config)]) == 0
    err = capsys.readouterr().err.splitlines()
    notices = [line for line in err if "busy with other processes" in line]
    assert len(notices) == 1 and notices[0].startswith("note: 1 of 2 cores is busy"), err
    assert "OMP_NUM_THREADS" in notices[0] and "torch_threads" in notices[0]
    assert seen and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    # torch_threads is applied before the recipe runs
    assert main(["train", str(config), "--torch_threads=1"]) == 0
    assert seen[-1] == 1
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 0)  # an idle machine: not a word
    assert main(["train", str(config)]) == 0
    assert "busy" not in capsys.readouterr().err
