"""transformers' KV caches and the forward() arguments that carry them, across versions.

The cache layout changed between releases (4.x: `key_cache` / `value_cache` lists; later: `layers[i].keys` /
`.values`), and so did forward()'s argument names (`past_key_values`, then `cache`; `logits_to_keep` since 4.50).
Callers see plain (B, H, T, D) tensors per layer and ask by name which argument a model takes.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

CACHE_ARGS = ("cache", "past_key_values")  # forward()'s name for the KV cache: newest first


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward() has a parameter `name` (e.g. "logits_to_keep")."""
    return name in inspect.signature(model.forward).parameters


def cache_arg(model: nn.Module) -> str | None:
    """The name under which the model's forward() takes a KV cache, or None when it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in CACHE_ARGS if n in params), None)


def dynamic_cache() -> Any:
    """A new, empty transformers DynamicCache."""
    from transformers import DynamicCache

    return DynamicCache()


def is_dynamic_cache(obj: Any) -> bool:
    """Whether `obj` is a transformers DynamicCache (the default cache of generate() and of a forward)."""
    from transformers import DynamicCache

    return isinstance(obj, DynamicCache)


def new_cache(kv: list[tuple[Tensor, Tensor]]) -> Any:
    """A DynamicCache holding these (B, H, T, D) keys and values per layer (empty list: an empty cache)."""
    cache = dynamic_cache()
    for i, (k, v) in enumerate(kv):
        cache.update(k[:, :, :0], v[:, :, :0], i)  # creates layer i without copying the data
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, kv):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in kv]
        cache.value_cache[:] = [v for _, v in kv]
    return cache


def kv_tensors(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """The cache's (keys, values) per layer, (B, H, T, D) each; empty for None."""
    if cache is None:
        return []
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_length(cache: Any) -> int:
    """Positions held per layer (T); 0 for an empty cache or None."""
    kv = kv_tensors(cache)
    return kv[0][0].shape[-2] if kv else 0
