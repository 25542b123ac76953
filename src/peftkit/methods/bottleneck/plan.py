"""The bottleneck adapter's terms in the memory plan (peftkit.plan.memory)."""

from __future__ import annotations

from typing import Any


def problems(shape: Any, s: Any) -> list[str]:
    if s.reduction_factor > shape.hidden_size:
        return [f"reduction_factor {s.reduction_factor} exceeds the hidden size {shape.hidden_size}"]
    return []


def _width(shape: Any, s: Any) -> int:
    return max(1, shape.hidden_size // s.reduction_factor)


def _per_block(s: Any) -> int:
    return 2 if s.variant == "houlsby" else 1


def trainable(shape: Any, s: Any) -> int:
    width = _width(shape, s)
    per_adapter = 2 * shape.hidden_size * width + width + shape.hidden_size
    return per_adapter * shape.num_layers * _per_block(s)


def activations(shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
    return _per_block(s) * (shape.hidden_size + 2 * _width(shape, s)) * adt
