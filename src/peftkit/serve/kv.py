"""The batch's KV cache as plain (B, H, T, D) tensors per layer: padding helpers for joining rows. Building and
reading transformers' cache objects (whose layout differs between releases) is in peftkit.hf.cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KV = list[tuple[Tensor, Tensor]]  # (B, H, T, D) keys and values per layer


def left_pad(t: Tensor, length: int) -> Tensor:
    """(B, H, L, D) -> (B, H, length, D), zeros in front."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0))


def join_rows(parts: list[KV]) -> KV:
    """Caches stacked along the batch, (sum B_i, H, T, D) per layer: each part left-padded to the longest T."""
    T = max(kv[0][0].shape[-2] for kv in parts)
    return [(torch.cat([left_pad(kv[i][0], T) for kv in parts]), torch.cat([left_pad(kv[i][1], T) for kv in parts]))
            for i in range(len(parts[0]))]


def keep_rows(kv: KV, keep: list[int], length: int) -> KV:
    """Rows `keep` of a batch's cache, with only its last `length` columns (the rest is padding for every
    row kept)."""
    index = torch.tensor(keep, device=kv[0][0].device)
    cut = kv[0][0].shape[-2] - length
    return [(k.index_select(0, index)[:, :, cut:], v.index_select(0, index)[:, :, cut:]) for k, v in kv]
