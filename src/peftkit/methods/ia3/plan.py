"""IA3's terms in the memory plan (peftkit.plan.memory). The planner's shapes are Llama-family blocks, so the
targets are IA3's Llama defaults (k_proj, v_proj, down_proj; what `peftkit train --method ia3` adapts with
--target-modules all-linear) or the names given, and a target is feedforward (its input is scaled) by the
Llama table's rule. `shape` is a plan ModelShape, `s` the plan Settings."""

from __future__ import annotations

from typing import Any

from ...hf.arch import IA3_DEFAULT_TARGETS

DEFAULT_TARGETS, FEEDFORWARD = IA3_DEFAULT_TARGETS["llama"]


def targets(shape: Any, s: Any) -> tuple[str, ...]:
    return DEFAULT_TARGETS if s.targets == "all-linear" else s.target_names(shape)


def _feedforward(name: str) -> bool:
    return any(name.endswith(entry) for entry in FEEDFORWARD)  # PEFT's rule for a list


def problems(shape: Any, s: Any) -> list[str]:
    unknown = sorted(set(targets(shape, s)) - set(shape.linears()))
    if unknown or not targets(shape, s):
        return [f"IA3 targets {unknown or list(s.targets)} are not linear layers of {shape.name} "
                f"(its layers: {', '.join(shape.linears())}; or 'all-linear' for IA3's defaults, 'attention')"]
    return []


def trainable(shape: Any, s: Any) -> int:
    """One vector per adapted linear: in_features entries for a feedforward target, out_features otherwise."""
    per_block = sum(i if _feedforward(n) else o for n, (i, o) in shape.linears().items() if n in targets(shape, s))
    return per_block * shape.num_layers


def activations(shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
    """Bytes per token per block: an output vector's product keeps the base output (for l's gradient); an
    input vector's keeps its input, cast to the adapter's dtype."""
    linears = shape.linears()
    return sum(linears[n][0] * adt if _feedforward(n) else linears[n][1] * act for n in targets(shape, s))
