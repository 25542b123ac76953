"""DoRA, weight-decomposed LoRA (Liu et al. 2024): a learned magnitude per output feature times the
direction of the low-rank-updated weight.

    W' = m * (W + s B A) / ||W + s B A||          the norm of each output row, taken over the input dimension
    y  = W' x + b = f * (W x + s B A x) + b,      f = m / ||W + s B A||, one factor per output feature (out,)

As the paper suggests (section 4.3) and HF PEFT does, the norm is treated as a constant: it is detached, so
gradients reach m through f and A, B through the low-rank path only, and no (out, in) matrix is kept for the
backward. The magnitude starts at ||W + s B A||, so f = 1 and a fresh adapter changes nothing it would not
change as plain LoRA (with B = 0: nothing at all).

Written as an addition to the output the base layer already produced (what PEFT's DoraLinearLayer returns):

    y = out + (f - 1) * (out - b) + f * s * B A x

Every weight here is in the (out, in) layout; the LoRA layer transposes Conv1D and embedding weights first
(for an embedding, "out" is the embedding dimension and "in" the vocabulary, as in PEFT).
"""

from __future__ import annotations

import torch
from torch import Tensor


def weight_norm(weight: Tensor, delta: Tensor) -> Tensor:
    """||W + delta|| of each output row, (out,), in float32 (or float64); never part of the autograd graph.
    `delta` is the scaled low-rank update s * B @ A, (out, in)."""
    with torch.no_grad():
        dtype = torch.promote_types(delta.dtype, torch.float32)
        return torch.linalg.norm(weight.to(dtype) + delta.to(dtype), dim=1)


def output_delta(base_out: Tensor, lora_out: Tensor, factor: Tensor, scaling: float) -> Tensor:
    """What DoRA adds to the layer's output: (f - 1) * base_out + f * s * lora_out.

    base_out: the base layer's output without its bias, (..., out); lora_out: B(A(x)), (..., out);
    factor: m / ||W + s B A||, (out,), carrying the magnitude's gradient."""
    f = factor.to(base_out.dtype)  # (out,), broadcasts over (..., out)
    return (f - 1) * base_out + (f * scaling) * lora_out.to(base_out.dtype)


def merged_weight(weight: Tensor, delta: Tensor, factor: Tensor) -> Tensor:
    """The weight that computes the DoRA layer with no adapter work: f * (W + s B A), (out, in)."""
    return factor[:, None] * (weight + delta)


def unmerged_weight(weight: Tensor, delta: Tensor, factor: Tensor) -> Tensor:
    """Undo `merged_weight` given the factor it used: W / f - s B A. Rows with f = 0 come out non-finite;
    the caller restores them from a copy kept at merge time."""
    return weight / factor[:, None] - delta
