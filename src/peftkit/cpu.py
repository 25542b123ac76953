"""How many CPU threads a peftkit command uses, chosen from the cores actually free to it.

torch's default is one thread per core the machine has. On a shared machine that collapses: OpenMP's
workers spin-wait for each other at every parallel region, and a worker whose core is taken by another
process holds the whole team up (measured on 2 cores beside one busy process: 46 s a training step with
2 threads, 7.3 s with 1). So a command counts the cores it may run on (its CPU affinity and a cgroup
quota), subtracts those busy with other work when it starts (sampled from /proc/stat, else the load
average), and uses the rest; its workers wait passively (`OMP_WAIT_POLICY=PASSIVE`, set by the `peftkit`
command before torch loads), so a process that starts beside it later slows it down but cannot stall it.

Nothing here imports torch at module level: `passive_waits_for_command` runs before torch is imported.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Share of a core another process must keep busy before it counts as taken (so 0.8 busy cores of 2 leave 1
# thread: a worker that shares its core with a busy process stalls every parallel region).
_FREE_SLACK = 0.2


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count and why, for the run's header and summary.json."""

    threads: int
    usable_cores: int
    busy_cores: float | None  # measured busy cores (other work) when starting; None when --threads was given
    reason: str

    def as_dict(self) -> dict:
        return {"threads": self.threads, "usable_cores": self.usable_cores, "busy_cores": self.busy_cores,
                "reason": self.reason}


def passive_waits_for_command(argv0: str) -> None:
    """Make OpenMP workers wait passively (sleep, not spin) in the `peftkit` command's process, unless the
    user chose a policy. Must run before torch is imported: the OpenMP runtime reads it once, at load.
    A Python program that imports peftkit is left alone (its process is its own)."""
    if Path(argv0 or "").name in ("peftkit", "peftkit.exe") and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def affinity_cores() -> list[int]:
    """The CPUs this process may run on (all of them where the platform cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_quota_cores(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The cgroup v2 CPU quota in cores (`cpu.max` "quota period"), None when unlimited or unknown."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _cpu_times(stat_text: str, cpus: list[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over `cpus` from /proc/stat text; None when a CPU's line is missing."""
    lines = {parts[0]: parts[1:] for parts in (line.split() for line in stat_text.splitlines()) if parts}
    busy = total = 0.0
    for cpu in cpus:
        fields = lines.get(f"cpu{cpu}")
        if fields is None or len(fields) < 5:
            return None
        values = [float(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        total += sum(values)
        busy += sum(values) - idle
    return busy, total


def busy_cores(cpus: list[int], sample_seconds: float = 0.3, stat_path: str = "/proc/stat") -> float | None:
    """How many of `cpus` other processes keep busy, from two reads of /proc/stat `sample_seconds` apart
    (this process sleeps in between, so the busy time is others'); the 1-minute load average where
    /proc/stat cannot be read; None when neither is available."""
    try:
        first = _cpu_times(Path(stat_path).read_text(), cpus)
        time.sleep(sample_seconds)
        second = _cpu_times(Path(stat_path).read_text(), cpus)
    except OSError:
        first = second = None
    if first is not None and second is not None and second[1] > first[1]:
        share = (second[0] - first[0]) / (second[1] - first[1])
        return max(0.0, share * len(cpus))
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def choose_threads(usable: int, busy: float | None, requested: int | None = None, processes: int = 1
                   ) -> ThreadChoice:
    """The threads for one of `processes` processes sharing `usable` cores of which `busy` are taken by
    other work: the free cores (a core counts as free unless another process keeps it busy more than
    20% of the time), shared equally among the processes, at least 1. `requested` (--threads) wins."""
    usable = max(1, usable)
    if requested:
        return ThreadChoice(requested, usable, None, "--threads")
    processes = max(1, processes)
    per = f" shared by {processes} processes" if processes > 1 else ""
    if busy is None:
        threads = max(1, usable // processes)
        return ThreadChoice(threads, usable, None, f"{usable} usable cores{per} (load unknown)")
    free = max(0.0, usable - busy)
    threads = max(1, min(usable, math.floor(free + _FREE_SLACK)) // processes)
    reason = f"{usable} usable cores, {busy:.1f} busy with other work when starting{per}"
    return ThreadChoice(threads, usable, round(busy, 2), reason)


def usable_cores() -> int:
    """The cores this process may use: its affinity, capped by a cgroup CPU quota."""
    cores = len(affinity_cores())
    quota = cgroup_quota_cores()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def configure_threads(requested: int | None = None, processes: int = 1) -> ThreadChoice:
    """Choose (`choose_threads`, measuring this machine) and apply the thread count to torch."""
    import torch

    usable = usable_cores()
    busy = None if requested else busy_cores(affinity_cores())
    choice = choose_threads(usable, busy, requested, processes)
    torch.set_num_threads(choice.threads)
    return choice


def describe(choice: ThreadChoice) -> str:
    """One line for a command's header: the count, why, and how to choose another."""
    plural = "s" if choice.threads != 1 else ""
    waits = os.environ.get("OMP_WAIT_POLICY", "torch's default").lower()
    if choice.reason == "--threads":
        return f"{choice.threads} CPU thread{plural} (--threads; OpenMP waits: {waits})"
    return f"{choice.threads} CPU thread{plural} ({choice.reason}; OpenMP waits: {waits}; --threads N to choose)"
