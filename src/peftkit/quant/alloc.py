"""Large CPU output buffers backed by transparent huge pages where the OS offers them.

A fresh 64 MB fp32 tensor costs about 16,000 page faults on first touch (4 KiB pages), which on the
machines we measured take longer than dequantizing into it. Linux can back the same memory with 2 MiB
pages if asked (madvise MADV_HUGEPAGE; THP in "madvise" mode, the common default), 512x fewer faults.
PyTorch offers this process-wide through THP_MEM_ALLOC_ENABLE; this asks for one tensor only.

Anything unusual (not Linux, not CPU, a small tensor, madvise missing or refusing) falls back to a plain
torch.empty: the result is the same tensor either way, only the time differs.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MIN_BYTES = 2 * HUGE_PAGE  # below this at most one huge page could be used: not worth a system call


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(numel: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """torch.empty(numel, dtype=dtype, device=device), asking for huge pages on large CPU buffers.
    Call it before anything touches the memory: pages already faulted in stay small."""
    out = torch.empty(numel, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if out.device.type == "cpu" and nbytes >= MIN_BYTES else None
    if madvise is not None:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the 2 MiB-aligned interior of the buffer
        end = (out.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            madvise(start, end - start, MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return out
