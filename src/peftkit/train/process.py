"""The process-wide settings a training command makes before it trains: CPU threads and the CPU allocator.

`train()` changes neither: a Python caller's process is the caller's. `peftkit train` (and each trial of
`peftkit sweep`, a process of its own) calls `configure_process` first; a Python caller who wants the same
settings calls it too:

    o = build_options({...})
    configure_process(o, init_distributed(o.device))
    train(o)
"""

from __future__ import annotations

from .. import cpu
from . import allocator
from .distributed import Dist
from .options import TrainOptions


def configure_process(o: TrainOptions, dist: Dist) -> cpu.ThreadChoice:
    """CPU threads: --threads, else the cores free to this process when it starts (an equal share of them
    for each of several processes on one CPU), said on the main process (cpu.py says why); and on a CPU
    glibc's mmap threshold, so that resident memory follows the live tensors (allocator.py says why)."""
    processes = dist.world_size if dist.enabled and dist.device.type == "cpu" else 1
    choice = cpu.configure_threads(o.threads, processes)
    if dist.is_main:
        print(f"peftkit train: {cpu.describe(choice)}", flush=True)
    if dist.device.type == "cpu":
        allocator.release_freed_memory()
    return choice
