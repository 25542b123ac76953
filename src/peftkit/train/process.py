"""The process-wide settings a training command makes before it trains: CPU threads and the CPU allocator.

`train()` changes neither: a Python caller's process is the caller's. `peftkit train` (and each trial of
`peftkit sweep`, a process of its own) calls `configure_process` first; a Python caller who wants the same
settings calls it too:

    o = build_options({...})
    configure_process(o, init_distributed(o.device))
    train(o)
"""

from __future__ import annotations

import os

import torch

from . import allocator
from .distributed import Dist
from .options import TrainOptions


def configure_process(o: TrainOptions, dist: Dist) -> None:
    """--threads (or, for several processes on one CPU, an equal share of the cores each, instead of every
    process using them all), and on a CPU glibc's mmap threshold, so that resident memory follows the live
    tensors (allocator.py says why)."""
    if o.threads:
        torch.set_num_threads(o.threads)
    elif dist.enabled and dist.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    if dist.device.type == "cpu":
        allocator.release_freed_memory()
