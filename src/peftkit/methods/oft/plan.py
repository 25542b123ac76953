"""OFT's terms in the memory plan (peftkit.plan.memory). The planner's shapes are Llama-family blocks of linear
layers; `peftkit train --method oft` makes the config OFTConfig(r=0, oft_block_size=--r), so the plan's r is the
block size b, moved per layer to divide its in_features as the layers move it. `shape` is a plan ModelShape, `s`
the plan Settings."""

from __future__ import annotations

from typing import Any

from ..lora.plan import INPUT_OF
from .rotation import block_layout, parameter_shape

NEUMANN_SAVED = 4  # (blocks, b, b) tensors autograd keeps per layer for the default series: Q, Q^2, Q^3, R


def problems(shape: Any, s: Any) -> list[str]:
    unknown = sorted(set(s.target_names(shape)) - set(shape.linears()))
    if unknown or not s.target_names(shape):
        return [f"OFT targets {unknown or list(s.targets)} are not linear layers of {shape.name} "
                f"(its layers: {', '.join(shape.linears())}; or 'all-linear', 'attention')"]
    if s.r < 2:
        return [f"OFT block size (--r) {s.r} has no trainable parameter (a 1x1 rotation is the identity); "
                "use 2 or more, e.g. 16 or 32"]
    return []


def trainable(shape: Any, s: Any) -> int:
    """Per adapted linear: blocks x b(b-1)/2, that is in_features (b - 1) / 2 when b divides in_features."""
    per_block = 0
    for name, (n_in, _) in shape.linears().items():
        if name in s.target_names(shape):
            rows, cols = parameter_shape(n_in, 0, s.r, False)
            per_block += rows * cols
    return per_block * shape.num_layers


def activations(shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
    """Bytes per token per block. Each rotation keeps its input for its gradient (a view of the layer's input:
    one saved copy per distinct input when no cast is needed, else each layer's cast copy); the frozen base keeps
    nothing of the rotated input. Per step, each layer keeps Q, Q^2, Q^3 and R (blocks x b x b each: the default
    5-term Cayley-Neumann series), spread here over the step's tokens."""
    linears = shape.linears()
    names = [n for n in s.target_names(shape) if n in linears]
    if adt == act:
        inputs = {INPUT_OF.get(n, n): width[INPUT_OF[n]] if INPUT_OF.get(n) in width else linears[n][0]
                  for n in names}
        total = float(sum(inputs.values()) * act)
    else:
        total = float(sum(linears[n][0] for n in names) * adt)
    dense = sum(linears[n][0] * block_layout(linears[n][0], 0, s.r)[1] for n in names)  # blocks * b * b = in * b
    return total + NEUMANN_SAVED * dense * adt / max(1, s.batch_size * s.seq_len)
