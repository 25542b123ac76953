"""Prefix tuning's terms in the memory plan (peftkit.plan.memory)."""

from __future__ import annotations

from typing import Any


def problems(shape: Any, s: Any) -> list[str]:
    return []


def trainable(shape: Any, s: Any) -> int:
    return s.num_virtual_tokens * shape.num_layers * 2 * shape.num_kv_heads * shape.dim_per_head


def activations(shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
    return 0.0  # the prefix's keys and values are counted with the block's own
