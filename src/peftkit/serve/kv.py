"""The batch's KV cache as plain (B, H, T, D) tensors per layer: padding helpers for joining rows. Building and
reading transformers' cache objects (whose layout differs between releases) is in peftkit.hf.cache."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def left_pad(t: Tensor, length: int) -> Tensor:
    """(B, H, L, D) -> (B, H, length, D), zeros in front."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0))
