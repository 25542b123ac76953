"""A small adapter over transformers' KV-cache classes (4.x: key_cache lists; 5.x: layers[i].keys/.values),
so the engine can build, read, pad and cut a batch's cache as plain (B, H, T, D) tensors per layer."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def new_cache(kv: list[tuple[Tensor, Tensor]]):
    """A DynamicCache holding these (B, H, T, D) keys and values per layer (empty list: an empty cache)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k[:, :, :0], v[:, :, :0], i)  # creates layer i without copying the data
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, kv):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in kv]
        cache.value_cache[:] = [v for _, v in kv]
    return cache


def kv_tensors(cache) -> list[tuple[Tensor, Tensor]]:
    if cache is None:
        return []
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_length(cache) -> int:
    kv = kv_tensors(cache)
    return kv[0][0].shape[-2] if kv else 0


def left_pad(t: Tensor, length: int) -> Tensor:
    """(B, H, L, D) -> (B, H, length, D), zeros in front."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0))
