"""How many CPU threads training uses, and how they wait, on a machine other processes share.

torch runs its CPU kernels on an OpenMP team of one thread per core. By default the team's idle
threads spin while they wait for the next kernel. When another process holds a core, the thread
that shares it burns its time slice spinning and is then queued behind that process each time the
team needs it: a 2-thread training step took 33 s against 0.7 s with one thread (issue 21;
bench/RESULTS.md has the before/after). A passive wait policy (OMP_WAIT_POLICY=PASSIVE: idle
threads sleep) removes that, and keeps the part of the shared core the team still gets.

The wait policy is read once, when the OpenMP runtime loads with torch, so it is decided before
torch is imported: `settle_threads` runs in the CLI before a training recipe is imported. Nothing
here imports torch at module level. An explicit choice wins: `torch_threads` in the config, then
OMP_NUM_THREADS, then OMP_WAIT_POLICY as set; lmforge only fills in what the user left open.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

BUSY_SHARE = 0.5  # a core other processes kept busy for more than half of the probe counts as taken
PROBE_SECONDS = 0.1  # /proc/stat counts in 10 ms ticks: 10 ticks per core tell busy from idle


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # the OpenMP team size training runs with
    set_threads: int | None  # what to pass to torch.set_num_threads (None: torch's own default, or OMP_NUM_THREADS)
    passive_wait: bool  # set OMP_WAIT_POLICY=PASSIVE before torch loads
    notice: str | None  # one line for the user when the machine is contended


def explicit_threads(configured: int | None, env: Mapping[str, str]) -> tuple[int | None, str | None]:
    """The thread count the user asked for, and where: torch_threads, else OMP_NUM_THREADS (a positive integer)."""
    if configured:
        return configured, "torch_threads"
    value = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP allows a list per nesting level
    return (int(value), "OMP_NUM_THREADS") if value.isdigit() and int(value) > 0 else (None, None)


def choose_threads(cores: int, busy: int | None, configured: int | None, env: Mapping[str, str],
                   torch_loaded: bool) -> ThreadChoice:
    """The team size and wait policy for `cores` usable cores of which `busy` are held by other processes.

    The count stays the user's (torch_threads, OMP_NUM_THREADS) or every usable core: with passive waiting a
    team on a shared core still gains from the share it gets (bench/RESULTS.md). Once torch is loaded the
    wait policy can no longer change, so the notice says how to avoid the spinning instead.
    """
    asked, source = explicit_threads(configured, env)
    threads = asked or cores
    free = cores - (busy or 0)
    contended = busy is not None and busy > 0 and threads > 1 and threads > free
    user_policy = "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env
    passive = contended and not torch_loaded and not user_policy
    notice = None
    if contended:
        held = f"{busy} of {cores} cores {'is' if busy == 1 else 'are'} busy with other processes"
        knob = (f"{source}={asked} as set" if source else "set torch_threads (config) or OMP_NUM_THREADS to change it")
        if passive:
            notice = (f"{held}: training's {threads} threads wait passively (OMP_WAIT_POLICY=PASSIVE) instead of spinning "
                      f"against them; {knob}")
        else:
            why = f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} as set" if "OMP_WAIT_POLICY" in env else (
                "GOMP_SPINCOUNT as set" if user_policy else "torch was already loaded")
            notice = (f"{held}: training's {threads} threads may spin-wait on them and run many times slower ({why}); "
                      f"torch_threads: {max(1, free)} or OMP_NUM_THREADS={max(1, free)} avoids that")
    return ThreadChoice(threads, configured if configured else None, passive, notice)


def usable_cores() -> set[int]:
    """The cores this process may run on (its affinity mask; every core where the platform has none)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _cpu_ticks(stat: Path) -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks, all ticks) so far, from /proc/stat's `cpuN user nice system idle iowait ...` lines."""
    ticks: dict[int, tuple[int, int]] = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            ticks[int(name[3:])] = (sum(values) - idle, sum(values))
    return ticks


def busy_cores(cores: set[int], seconds: float = PROBE_SECONDS, stat: Path = Path("/proc/stat")) -> int | None:
    """How many of `cores` other processes keep busy, measured over `seconds` (this process sleeps meanwhile).
    None where the kernel does not say (no /proc/stat, or a core missing from it)."""
    try:
        before = _cpu_ticks(stat)
        time.sleep(seconds)
        after = _cpu_ticks(stat)
    except (OSError, ValueError, IndexError):
        return None
    if not cores or not cores <= before.keys() or not cores <= after.keys():
        return None
    busy = 0
    for core in cores:
        used, total = (a - b for a, b in zip(after[core], before[core]))
        if total > 0 and used / total > BUSY_SHARE:
            busy += 1
    return busy


def _torch_loaded() -> bool:
    return "torch" in sys.modules


def settle_threads(configured: int | None, env: dict[str, str] | None = None) -> ThreadChoice:
    """Decide the team size and wait policy, apply them (environment before torch loads, then torch's thread count),
    and return the choice; its notice is for the caller to print. Probes the cores only when it can matter."""
    env = os.environ if env is None else env
    torch_loaded = _torch_loaded()
    cores = usable_cores()
    asked, _ = explicit_threads(configured, env)
    # One thread never waits on a team, and a loaded torch keeps its wait policy: no probe (the tests' in-process runs)
    worth_probing = (asked or len(cores)) > 1 and not torch_loaded
    choice = choose_threads(len(cores), busy_cores(cores) if worth_probing else None, configured, env, torch_loaded)
    if choice.passive_wait:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if choice.set_threads:
        import torch

        torch.set_num_threads(choice.set_threads)
    return choice
