"""Return freed tensor memory to the OS at once while training on a CPU (glibc's malloc).

By default glibc serves allocations below a moving threshold (up to 32 MiB) from its heap and keeps what
is freed there for reuse. A training step frees and reallocates gigabytes of activations of many sizes;
the heap fragments and the process's resident memory climbs well above what is alive: on SmolLM2-135M,
LoRA at batch 4 x 256, the peak RSS was 3.7 GB while at most 2.6 GB was ever in use. A fixed threshold of
128 KiB gives every larger tensor its own mapping, unmapped when the tensor is freed, so the resident
memory follows the live tensors (and the planner's prediction). The cost is fresh page faults on each
large allocation.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 128 * 1024


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap threshold (fixed, no longer adapting); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: leave them alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
