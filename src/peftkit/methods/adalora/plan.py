"""AdaLoRA's terms in the memory plan (peftkit.plan.memory): the plan's rank is init_r (the allocator only
zeroes singular values, so every triplet trains to the end). `shape` is a plan ModelShape, `s` the plan
Settings."""

from __future__ import annotations

from typing import Any


def problems(shape: Any, s: Any) -> list[str]:
    found = []
    chosen = s.target_names(shape)
    unknown = sorted(set(chosen) - set(shape.linears()))
    if unknown or not chosen:
        found.append(f"targets {unknown or list(s.targets)} are not linear layers of {shape.name} "
                     f"(its layers: {', '.join(shape.linears())}; or 'all-linear', 'attention')")
    too_big = [n for n, (i, o) in shape.linears().items() if n in chosen and s.r > min(i, o)]
    if too_big:
        found.append(f"initial rank {s.r} is larger than the layers {', '.join(too_big)}: a rank above the "
                     "smallest side adds parameters but no expressive power")
    return found


def trainable(shape: Any, s: Any) -> int:
    """A (r, in), E (r, 1) and B (out, r) per adapted linear, r = init_r."""
    per_block = sum(s.r * (i + o + 1) for n, (i, o) in shape.linears().items() if n in s.target_names(shape))
    return per_block * shape.num_layers


def activations(shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
    """Bytes per token per block: each adapter keeps its input (cast to the adapter's dtype) and the (r,)
    product x (A * E)^T that B reads."""
    names = s.target_names(shape)
    return sum(shape.linears()[n][0] * adt for n in names) + len(names) * s.r * adt
