"""VeRA's terms in the memory plan (peftkit.plan.memory). The planner's shapes are Llama-family blocks; the
targets are what `peftkit train --method vera` adapts (--target-modules, all-linear by default). `shape` is
a plan ModelShape, `s` the plan Settings. The shared projections are frozen buffers, not trained parameters,
and are left out of the plan: r * (max in + max out) fp32 numbers, 22.5 MB for Llama-2-7B on all linears at
r=256."""

from __future__ import annotations

from typing import Any


def problems(shape: Any, s: Any) -> list[str]:
    unknown = sorted(set(s.target_names(shape)) - set(shape.linears()))
    if unknown or not s.target_names(shape):
        return [f"VeRA targets {unknown or list(s.targets)} are not linear layers of {shape.name} "
                f"(its layers: {', '.join(shape.linears())}; or 'all-linear', 'attention')"]
    return []


def trainable(shape: Any, s: Any) -> int:
    """Per adapted linear: lambda_b (out_features) and lambda_d (r)."""
    per_block = sum(o + s.r for n, (_, o) in shape.linears().items() if n in s.target_names(shape))
    return per_block * shape.num_layers


def activations(shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
    """Bytes per token per block: per target, A_l x (r values, kept for lambda_d's gradient) and B_l(...)
    (out values, kept for lambda_b's gradient), both in the adapter's dtype. The frozen A_l and B_l need no
    saved input."""
    linears = shape.linears()
    return sum((s.r + linears[n][1]) * adt for n in s.target_names(shape) if n in linears)
